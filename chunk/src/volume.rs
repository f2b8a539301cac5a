//! The volume data path: one volume as an iSCSI [`BlockDevice`], with every
//! write synchronously replicated to the extent's replica set.
//!
//! This module owns the mapping from logical blocks to extents, the
//! per-extent view of the replica set, the write protocol (ack only when
//! every member of the current set has the data), read failover and
//! read-repair. It reaches replicas only through [`ReplicaPeer`] and meta
//! only through [`Membership`], so it is independent of any transport.
//!
//! # Write protocol (per extent)
//!
//! 1. Take the extent's range lock over the covered 4 KiB blocks (so
//!    read-modify-write of partial blocks and overlapping writes can never
//!    interleave differently on different replicas; disjoint writes run in
//!    parallel, and different extents never share a lock).
//! 2. Get the set (cached; allocated through [`Membership::ensure_extent`] on
//!    the first write) and send the write to every member concurrently,
//!    tagged with the set's epoch.
//! 3. Members that answer `StaleEpoch`: our view is old; refresh it from meta
//!    and go again. Members that fail otherwise (unreachable, timeout, no
//!    space, disk error) are removed through [`Membership::remove_member`]
//!    (epoch bump), but only when at least one member does hold the write:
//!    the set is never shrunk to nothing, and if nobody has the write the
//!    command fails without touching membership.
//! 4. Against the new set, members that already hold the write are *fenced*
//!    to the new epoch ([`ReplicaPeer::fence`]) and any member that does not
//!    hold it yet gets it. Only when every member of the current set holds
//!    the write at the current epoch is it acknowledged.
//!
//! So an acknowledged write is on every member of the current set, and the
//! survivors refuse the old epoch (an access point with an old view cannot
//! write behind the new set's back). A removed member is fenced best-effort
//! in the background if it is reachable at all.
//!
//! Before failing a command because no member of its view holds the
//! mutation (step 3), the view is checked against meta: if meta's set is
//! newer (e.g. a learner that took the mutation was promoted meanwhile) the
//! protocol goes on against that set, and fails only if no member of it
//! holds the mutation either. A membership change alone never fails a write.
//!
//! # Members that leave while a call waits
//!
//! A frozen replica (SIGSTOP, a hung host, a partition that keeps the TCP
//! connection up) answers nothing, so its calls would only end with the
//! peer timeout. Two things end such a wait sooner. First, the peer's hang
//! detection (`crate::health`, in `Inner::call`): a call waiting a few
//! times the peer's p99 (0.3–1 s) probes the peer on a connection of its
//! own, and no answer fails the call as unreachable, so the member is
//! removed like any failed member (below, step 3). Second, meta declares such a chunk dead
//! after its liveness timeout and moves it out of every set (epoch + 1);
//! so while a round of calls waits, the volume watches the extent's set:
//! once after [`VolumeConfig::recheck_after`] (a change may have been
//! signalled before the round began), then on every
//! [`Membership::changes`] signal (the chunk server's is meta's revision
//! from its heartbeat answers, so a removal reaches a waiting round one
//! heartbeat after meta made it). When meta's set has a newer epoch and a
//! chunk whose call still waits is neither member nor learner of it, that
//! call is dropped (`abandoned_calls`) and the round ends as if the chunk
//! had been removed by this access point: the next round runs against the
//! newer set, fencing the holders to its epoch and writing to members that
//! lack the mutation, and the write is acknowledged only when every member
//! of that set holds it. A member that is merely slow (it answers its
//! probes, and stays in meta's set) is waited for up to the peer timeout,
//! and a write acknowledged under the new epoch is on every member of the
//! set meta recorded under it. Whatever the dropped call still does on the frozen chunk does not
//! matter: it is no member any more (it is fenced in the background, and a
//! chunk declared dead garbage-collects or resyncs when it returns). Reads
//! waiting on such a member are retried against the newer set.
//!
//! # Learners
//!
//! Writes, unmaps and flushes also go to the set's *learners* (chunks being
//! filled by a recovery task, see `crate::recovery`), in the same round and
//! with the same epoch. A learner that fails is reported through
//! [`Membership::remove_member`] (meta drops it and its task) and the I/O
//! goes on without it: a learner's failure never fails the command and
//! costs no extra round. The ack still waits for every learner's answer
//! (bounded by the peer timeout) and for the report, so a learner can never
//! be promoted while missing an acknowledged write; if meta cannot take the
//! report the command fails. Reads never go to learners.
//!
//! `SYNCHRONIZE CACHE` flushes every extent written without FUA since its
//! last flush on every member, with the same removal rules; FUA writes are
//! durable on every member before the ack.
//!
//! # Reads
//!
//! From the local chunk when it is a member, else from the members in set
//! order. A copy that fails its checksum is skipped; once good data is found
//! the bad copies are repaired (block by block, each repair only overwrites
//! a block that still fails) before the data is returned. Data that failed a
//! checksum is never returned; if every copy fails, the read fails with a
//! MEDIUM ERROR.
//!
//! # Block sizes
//!
//! Replicas store 4 KiB blocks. Logical block sizes 512 and 4096 are
//! supported; a 512-byte write that covers a 4 KiB block partially reads the
//! block (through the normal read path, with failover and repair), merges,
//! and writes the whole block, under the range lock.
//!
//! # Copy-on-write (snapshots and clones)
//!
//! Each extent slot caches a view from [`Membership::resolve`]: the extent
//! reads go to (possibly an older generation, or a clone parent's extent)
//! and the volume's own writable extent. A write to an index the volume
//! does not own first places it or copies it up (`volume/cow.rs`: every
//! member copies the source locally, then meta commits), serialized per
//! extent. [`VolumeDevice::invalidate`] drops every view after in-flight
//! writes finish (a chunk calls it when meta's revision moves, before
//! reporting the revision applied: the snapshot barrier).
//!
//! # Thin provisioning
//!
//! An extent that was never written has no replica set and reads as zeros
//! without being created. UNMAP deallocates whole 4 KiB blocks on every
//! member and zero-fills partial blocks; GET LBA STATUS reports unallocated
//! extents as deallocated and allocated ones as mapped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use ironblock_target::scsi::{BlockDevice, DeviceError, DeviceIdentity};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::replica::{
    ChunkId, ExtentId, ExtentView, Membership, MembershipError, PeerDirectory, PeerError,
    ReplicaPeer, ReplicaSet,
};
use crate::store::{BLOCK_SIZE, MAX_EXTENT_SIZE};

mod cow;

/// Number of shards of the per-extent state table.
const SHARDS: usize = 64;
/// GET LBA STATUS looks at most this many unallocated extents ahead.
const LBA_STATUS_SCAN_EXTENTS: u64 = 1024;

/// Configuration of one [`VolumeDevice`].
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// Volume id (also the extent-id prefix on every replica).
    pub volume: String,
    /// Current size in bytes, a multiple of `logical_block_size`.
    pub size_bytes: u64,
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// Extent size; must equal the extent size of every replica's store.
    pub extent_size: u64,
    /// Shown in VPD pages 0x80 / 0x83.
    pub identity: DeviceIdentity,
    /// A replica call taking longer than this counts as unreachable.
    pub peer_timeout: Duration,
    /// Rounds of (send, refresh-or-remove) per extent operation before the
    /// command fails with NOT READY.
    pub max_attempts: u32,
    /// A round of replica calls still waiting this long asks meta for the
    /// extent's set once, then again whenever [`Membership::changes`]
    /// signals; a chunk meta moved out of the set under a newer epoch is
    /// not waited for any longer (see "Members that leave while a call
    /// waits" in the module docs). Rounds that answer sooner never ask.
    pub recheck_after: Duration,
    /// Thin provisioned (the default): READ CAPACITY(16) reports LBPME and
    /// UNMAP / WRITE SAME with UNMAP / GET LBA STATUS are served. A thick
    /// volume's capacity is reserved when it is created, so its LUN is
    /// fully provisioned: no LBPME, no UNMAP. (An initiator such as QEMU
    /// then also skips the GET LBA STATUS it would send before each read
    /// on behalf of an NBD client, which halves its commands.)
    pub thin: bool,
}

impl VolumeConfig {
    /// Defaults: 512-byte logical blocks, 64 MiB extents, 10 s peer timeout.
    pub fn new(volume: impl Into<String>, size_bytes: u64, identity: DeviceIdentity) -> Self {
        VolumeConfig {
            volume: volume.into(),
            size_bytes,
            logical_block_size: 512,
            extent_size: crate::store::DEFAULT_EXTENT_SIZE,
            identity,
            peer_timeout: Duration::from_secs(10),
            max_attempts: 8,
            recheck_after: Duration::from_millis(500),
            thin: true,
        }
    }
}

/// Errors of the volume data path.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("bad volume configuration: {0}")]
    Config(String),
    #[error("I/O at byte {offset} length {len} is outside the volume ({size} bytes) or not block-aligned")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("cannot shrink volume from {from} to {to} bytes")]
    Shrink { from: u64, to: u64 },
    /// No member could take or serve the request; nothing was acknowledged.
    #[error("extent {extent} unavailable: {reason}")]
    Unavailable { extent: ExtentId, reason: String },
    #[error("extent {extent}: no space on the replicas")]
    NoSpace { extent: ExtentId },
    /// Every readable copy failed its checksum.
    #[error("extent {extent}: every copy of bytes {offset}+{len} failed its checksum")]
    Unreadable {
        extent: ExtentId,
        offset: u64,
        len: u64,
    },
    /// Every member failed with a disk (not connectivity) error.
    #[error("extent {extent}: replicas failed: {reason}")]
    Failed { extent: ExtentId, reason: String },
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl VolumeError {
    fn into_device(self, write: bool) -> DeviceError {
        match self {
            VolumeError::Unavailable { .. } => DeviceError::Unavailable(self.to_string()),
            VolumeError::Membership(MembershipError::Unavailable(_)) => {
                DeviceError::Unavailable(self.to_string())
            }
            VolumeError::NoSpace { .. }
            | VolumeError::Membership(MembershipError::NoPlacement { .. }) => DeviceError::NoSpace,
            VolumeError::Unreadable { .. } => {
                DeviceError::Read(std::io::Error::other(self.to_string()))
            }
            VolumeError::Failed { .. } if write => {
                DeviceError::Write(std::io::Error::other(self.to_string()))
            }
            VolumeError::Failed { .. } => {
                DeviceError::Read(std::io::Error::other(self.to_string()))
            }
            other => DeviceError::Other(other.to_string()),
        }
    }
}

/// Counters of one volume (monotonic).
#[derive(Debug, Default)]
pub struct VolumeMetrics {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Bytes read and written through this chunk's portal (meta learns the
    /// volume's home chunk from them).
    pub io_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub unmaps: AtomicU64,
    /// Members or learners removed from a set because they failed a
    /// write/flush/unmap.
    pub member_removals: AtomicU64,
    /// Views refreshed from meta after a replica reported a newer epoch.
    pub stale_refreshes: AtomicU64,
    /// Reads served from another member because a copy failed its checksum.
    pub checksum_failovers: AtomicU64,
    /// Blocks repaired (or found already good) after a checksum failure.
    pub repairs: AtomicU64,
    /// Partial 4 KiB blocks read for read-modify-write.
    pub rmw_reads: AtomicU64,
    /// Extents copied up (copy-on-write) before their first write.
    pub copy_ups: AtomicU64,
    /// Times every cached extent view was dropped ([`VolumeDevice::invalidate`]).
    pub invalidations: AtomicU64,
    /// Replica calls no longer waited for because meta moved their chunk
    /// out of the set (newer epoch) while they waited.
    pub abandoned_calls: AtomicU64,
    /// Replica calls that failed because their peer did not answer a probe
    /// (hung: frozen or cut off; see `crate::health`).
    pub hung_calls: AtomicU64,
    /// Probes of a slow call's peer that found it alive (the call was
    /// waited for).
    pub slow_calls: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Per-extent state: the cached view (where reads and writes go), the range
/// lock, whether it has writes not yet flushed, and the copy-up lock.
#[derive(Default)]
struct Slot {
    view: Mutex<Option<CachedView>>,
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
    dirty: AtomicBool,
    /// Serializes copy-ups of this extent: concurrent writers wait for the
    /// first one's copy instead of starting their own.
    copy: tokio::sync::Mutex<()>,
}

/// The cached resolution of one extent index (see the module docs on
/// copy-on-write).
#[derive(Clone, Debug, Default)]
struct CachedView {
    /// Reads go here; `None`: zeros.
    read: Option<ExtentView>,
    /// Writes go here; `None`: a write copies up (or places) first.
    own: Option<ExtentView>,
}

/// Holds `[start, end)` of one extent exclusively until dropped.
struct RangeGuard {
    slot: Arc<Slot>,
    range: (u64, u64),
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        {
            let mut held = self.slot.held.lock();
            if let Some(i) = held.iter().position(|r| *r == self.range) {
                held.swap_remove(i);
            }
        }
        self.slot.released.notify_waiters();
    }
}

async fn lock_range(slot: &Arc<Slot>, start: u64, end: u64) -> RangeGuard {
    loop {
        let notified = slot.released.notified();
        tokio::pin!(notified);
        // Register before checking, so a release in between is not missed.
        notified.as_mut().enable();
        {
            let mut held = slot.held.lock();
            if !held.iter().any(|&(s, e)| s < end && start < e) {
                held.push((start, end));
                return RangeGuard {
                    slot: slot.clone(),
                    range: (start, end),
                };
            }
        }
        notified.await;
    }
}

/// Completes with meta's newer set once one published on `newer` no longer
/// holds `chunk` (neither member nor learner); pends forever otherwise.
async fn left_set(newer: &mut watch::Receiver<Option<ReplicaSet>>, chunk: &ChunkId) -> ReplicaSet {
    if let Ok(s) = newer
        .wait_for(|s| s.as_ref().is_some_and(|s| !s.holds(chunk)))
        .await
    {
        if let Some(s) = s.as_ref() {
            return s.clone();
        }
    }
    std::future::pending().await
}

/// A mutation replicated to every member.
enum Mutation {
    Write { offset: u64, data: Bytes, fua: bool },
    Unmap { offset: u64, len: u64 },
    Flush,
}

impl Mutation {
    fn name(&self) -> &'static str {
        match self {
            Mutation::Write { .. } => "write",
            Mutation::Unmap { .. } => "unmap",
            Mutation::Flush => "flush",
        }
    }
}

struct Inner {
    cfg: VolumeConfig,
    size: AtomicU64,
    local: Option<Arc<dyn ReplicaPeer>>,
    peers: Arc<dyn PeerDirectory>,
    membership: Arc<dyn Membership>,
    shards: Vec<RwLock<HashMap<u64, Arc<Slot>>>>,
    metrics: VolumeMetrics,
    span: tracing::Span,
    /// Held shared by every write/unmap for as long as it uses cached views,
    /// exclusively by [`VolumeDevice::invalidate`].
    gate: Arc<tokio::sync::RwLock<()>>,
}

/// One volume as a [`BlockDevice`]. Cheap to clone.
#[derive(Clone)]
pub struct VolumeDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VolumeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeDevice")
            .field("volume", &self.inner.cfg.volume)
            .field("size", &self.inner.size.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl VolumeDevice {
    /// `local` is this chunk's own replica (used directly, and preferred for
    /// reads, whenever this chunk is a member); `peers` reaches the others.
    pub fn new(
        cfg: VolumeConfig,
        membership: Arc<dyn Membership>,
        peers: Arc<dyn PeerDirectory>,
        local: Option<Arc<dyn ReplicaPeer>>,
    ) -> Result<Self, VolumeError> {
        let bs = u64::from(cfg.logical_block_size);
        if bs != 512 && bs != 4096 {
            return Err(VolumeError::Config(format!(
                "logical block size {bs} is not 512 or 4096"
            )));
        }
        if cfg.extent_size == 0
            || !cfg.extent_size.is_multiple_of(BLOCK_SIZE)
            || cfg.extent_size > MAX_EXTENT_SIZE
        {
            return Err(VolumeError::Config(format!(
                "extent size {} must be a non-zero multiple of {BLOCK_SIZE} up to {MAX_EXTENT_SIZE}",
                cfg.extent_size
            )));
        }
        if !cfg.size_bytes.is_multiple_of(bs) {
            return Err(VolumeError::Config(format!(
                "size {} is not a multiple of the block size {bs}",
                cfg.size_bytes
            )));
        }
        ExtentId::new(cfg.volume.clone(), 0)
            .validate()
            .map_err(|e| VolumeError::Config(e.to_string()))?;
        if cfg.max_attempts == 0 {
            return Err(VolumeError::Config(
                "max_attempts must be at least 1".into(),
            ));
        }
        let span = tracing::info_span!("volume", volume = %cfg.volume);
        Ok(VolumeDevice {
            inner: Arc::new(Inner {
                size: AtomicU64::new(cfg.size_bytes),
                cfg,
                local,
                peers,
                membership,
                shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
                metrics: VolumeMetrics::default(),
                span,
                gate: Arc::new(tokio::sync::RwLock::new(())),
            }),
        })
    }

    /// The volume id.
    pub fn volume(&self) -> &str {
        &self.inner.cfg.volume
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    /// Grow the volume online (the engine raises CAPACITY DATA HAS CHANGED).
    pub fn grow(&self, new_size_bytes: u64) -> Result<(), VolumeError> {
        let bs = u64::from(self.inner.cfg.logical_block_size);
        if !new_size_bytes.is_multiple_of(bs) {
            return Err(VolumeError::Config(format!(
                "size {new_size_bytes} is not a multiple of the block size {bs}"
            )));
        }
        let prev = self.inner.size.fetch_max(new_size_bytes, Ordering::AcqRel);
        if prev > new_size_bytes {
            return Err(VolumeError::Shrink {
                from: prev,
                to: new_size_bytes,
            });
        }
        tracing::info!(parent: &self.inner.span, from = prev, to = new_size_bytes, "volume grown");
        Ok(())
    }

    pub fn metrics(&self) -> &VolumeMetrics {
        &self.inner.metrics
    }

    /// Drop every cached extent view, after the writes (and unmaps) that use
    /// the old views have finished and every extent written without FUA has
    /// been flushed (its next flush may go to a newer generation). Returns
    /// only then: a chunk calls this when meta's revision changes and reports
    /// the revision as applied afterwards (the snapshot barrier). New writes
    /// wait meanwhile.
    pub async fn invalidate(&self) {
        let span = tracing::debug_span!(parent: &self.inner.span, "invalidate");
        async {
            let _exclusive = self.inner.gate.write().await;
            if let Err(e) = self.inner.flush().await {
                tracing::warn!(error = %e, "flush before dropping extent views failed");
            }
            for shard in &self.inner.shards {
                for slot in shard.read().values() {
                    *slot.view.lock() = None;
                }
            }
            bump(&self.inner.metrics.invalidations);
        }
        .instrument(span)
        .await
    }

    /// Read `len` bytes at byte `offset` (multiples of the logical block
    /// size).
    pub async fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let span = tracing::debug_span!(parent: &self.inner.span, "read", offset, len = buf.len());
        self.inner.read(offset, buf).instrument(span).await
    }

    /// Write `data` at byte `offset` (multiples of the logical block size).
    pub async fn write_bytes(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), VolumeError> {
        let span =
            tracing::debug_span!(parent: &self.inner.span, "write", offset, len = data.len(), fua);
        self.inner.write(offset, data, fua).instrument(span).await
    }

    /// Flush every extent written without FUA, on every member.
    pub async fn flush_all(&self) -> Result<(), VolumeError> {
        let span = tracing::debug_span!(parent: &self.inner.span, "flush");
        self.inner.flush().instrument(span).await
    }

    /// Deallocate `len` bytes at byte `offset`.
    pub async fn unmap_bytes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let span = tracing::debug_span!(parent: &self.inner.span, "unmap", offset, len);
        self.inner.unmap(offset, len).instrument(span).await
    }
}

fn round_down(x: u64) -> u64 {
    x - x % BLOCK_SIZE
}

fn round_up(x: u64) -> u64 {
    round_down(x + BLOCK_SIZE - 1)
}

/// A piece of a volume-level request that falls in one extent.
#[derive(Clone, Copy, Debug)]
struct Part {
    index: u64,
    /// Byte offset within the extent.
    offset: u64,
    len: u64,
    /// Byte offset within the request buffer.
    buf_offset: usize,
}

impl Inner {
    fn extent(&self, index: u64) -> ExtentId {
        ExtentId::new(self.cfg.volume.clone(), index)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let bs = u64::from(self.cfg.logical_block_size);
        let size = self.size.load(Ordering::Acquire);
        let ok = offset.is_multiple_of(bs)
            && len.is_multiple_of(bs)
            && offset.checked_add(len).is_some_and(|end| end <= size);
        if ok {
            Ok(())
        } else {
            Err(VolumeError::OutOfRange { offset, len, size })
        }
    }

    /// Split `[offset, offset+len)` at extent boundaries.
    fn parts(&self, offset: u64, len: u64) -> Vec<Part> {
        let es = self.cfg.extent_size;
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let index = pos / es;
            let within = pos % es;
            let n = (es - within).min(end - pos);
            out.push(Part {
                index,
                offset: within,
                len: n,
                buf_offset: (pos - offset) as usize,
            });
            pos += n;
        }
        out
    }

    fn slot(&self, index: u64) -> Arc<Slot> {
        let shard = &self.shards[(index % SHARDS as u64) as usize];
        if let Some(s) = shard.read().get(&index) {
            return s.clone();
        }
        shard.write().entry(index).or_default().clone()
    }

    /// Remember `set` for the cached views of `extent` unless a newer one is
    /// cached; returns the newest.
    fn install(&self, slot: &Slot, extent: &ExtentId, set: ReplicaSet) -> ReplicaSet {
        let mut guard = slot.view.lock();
        let mut newest = set;
        if let Some(c) = guard.as_mut() {
            for v in [c.read.as_mut(), c.own.as_mut()].into_iter().flatten() {
                if v.id == *extent {
                    if v.set.epoch > newest.epoch {
                        newest = v.set.clone();
                    } else {
                        v.set = newest.clone();
                    }
                }
            }
        }
        newest
    }

    /// The extent writes go to: cached, else from meta; with `allocate`, a
    /// missing one is placed or copied up first ([`Inner::acquire_own`]).
    /// `None` (only without `allocate`): the volume owns nothing writable
    /// there.
    async fn view(
        &self,
        index: u64,
        slot: &Slot,
        allocate: bool,
    ) -> Result<Option<ExtentView>, VolumeError> {
        if let Some(c) = slot.view.lock().as_ref() {
            if c.own.is_some() || !allocate {
                return Ok(c.own.clone());
            }
        }
        if allocate {
            return self.acquire_own(index, slot).await.map(Some);
        }
        Ok(self.fetch(index, slot).await?.own)
    }

    /// The extent reads go to: cached, else from meta. `None`: never written
    /// (zeros).
    async fn read_view(&self, index: u64, slot: &Slot) -> Result<Option<ExtentView>, VolumeError> {
        if let Some(c) = slot.view.lock().as_ref() {
            return Ok(c.read.clone());
        }
        Ok(self.fetch(index, slot).await?.read)
    }

    /// Resolve from meta and cache the answer. Unwritten answers are not
    /// cached, since another access point may write.
    async fn fetch(&self, index: u64, slot: &Slot) -> Result<CachedView, VolumeError> {
        let r = self.membership.resolve(&self.cfg.volume, index).await?;
        let view = CachedView {
            read: r.read,
            own: r.own,
        };
        if view.read.is_some() || view.own.is_some() {
            *slot.view.lock() = Some(view.clone());
        }
        Ok(view)
    }

    /// Fetch the set of `extent` from meta after a replica said our epoch is
    /// old.
    async fn refresh(&self, extent: &ExtentId, slot: &Slot) -> Result<ReplicaSet, VolumeError> {
        bump(&self.metrics.stale_refreshes);
        let extent = extent.clone();
        match self.membership.current(&extent).await? {
            Some(s) => {
                tracing::info!(extent = %extent, epoch = s.epoch, members = ?s.members, "replica set refreshed");
                Ok(self.install(slot, &extent, s))
            }
            None => Err(VolumeError::Unavailable {
                extent,
                reason: "a replica reported a newer epoch but meta knows no set".into(),
            }),
        }
    }

    fn peer(&self, chunk: &ChunkId) -> Option<Arc<dyn ReplicaPeer>> {
        match &self.local {
            Some(l) if l.chunk() == chunk => Some(l.clone()),
            _ => self.peers.peer(chunk),
        }
    }

    /// Run a replica call to `peer` with the peer timeout and, for a peer
    /// with a [`PeerHealth`](crate::health::PeerHealth), hang detection: a
    /// call still waiting after the peer's suspicion time probes the peer,
    /// and fails as unreachable if the probe gets no answer (see
    /// `crate::health`); a peer that answers the probe is waited for.
    async fn call<T>(
        &self,
        peer: &dyn ReplicaPeer,
        fut: impl std::future::Future<Output = Result<T, PeerError>>,
    ) -> Result<T, PeerError> {
        let timeout = self.cfg.peer_timeout;
        let timed_out = || PeerError::Unreachable(format!("no answer within {timeout:?}"));
        let Some(health) = peer.health() else {
            return tokio::time::timeout(timeout, fut)
                .await
                .unwrap_or_else(|_| Err(timed_out()));
        };
        let _in_flight = health.call_started();
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let answered = |r: &Result<T, PeerError>| {
            if !matches!(r, Err(PeerError::Unreachable(_))) {
                health.answered(started.elapsed());
            }
        };
        tokio::pin!(fut);
        loop {
            let suspect = (tokio::time::Instant::now() + health.suspect_after()).min(deadline);
            tokio::select! {
                r = &mut fut => {
                    answered(&r);
                    return r;
                }
                () = tokio::time::sleep_until(suspect) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(timed_out());
            }
            tokio::select! {
                r = &mut fut => {
                    answered(&r);
                    return r;
                }
                v = health.probe(|| peer.ping()) => match v {
                    Ok(()) => {
                        bump(&self.metrics.slow_calls);
                    }
                    Err(reason) => {
                        bump(&self.metrics.hung_calls);
                        return Err(PeerError::Unreachable(format!(
                            "no answer within {:?}, and {} is hung: {reason}",
                            started.elapsed(),
                            peer.chunk()
                        )));
                    }
                },
            }
        }
    }

    /// Await `calls` (a round of replica calls at `epoch`) while watching
    /// meta's set of `extent`: once the round has waited
    /// [`VolumeConfig::recheck_after`], and again whenever
    /// [`Membership::changes`] signals, a set with a newer epoch is
    /// published on `newer`. The calls themselves decide what that means
    /// for them ([`left_set`]).
    async fn join_watching<T>(
        &self,
        extent: &ExtentId,
        epoch: u64,
        newer: &watch::Sender<Option<ReplicaSet>>,
        calls: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(calls);
        tokio::select! {
            r = &mut calls => r,
            () = self.watch_set(extent, epoch, newer) => calls.await,
        }
    }

    /// The watcher of [`Inner::join_watching`]; returns only when there is
    /// nothing to watch.
    async fn watch_set(
        &self,
        extent: &ExtentId,
        epoch: u64,
        newer: &watch::Sender<Option<ReplicaSet>>,
    ) {
        let Some(mut changes) = self.membership.changes() else {
            return;
        };
        // The first look covers a change signalled before this round
        // started (its view may be the old one); later looks follow the
        // signals. A round that answers within `recheck_after` asks nothing.
        tokio::select! {
            () = tokio::time::sleep(self.cfg.recheck_after) => {}
            r = changes.changed() => if r.is_err() { return },
        }
        loop {
            match self.membership.current(extent).await {
                Ok(Some(s)) if s.epoch > epoch => {
                    newer.send_replace(Some(s));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(extent = %extent, error = %e, "could not re-check the replica set")
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Apply `op` to every member and learner of the extent's current set;
    /// see the module docs for the protocol. `Ok` means every member of the
    /// current set has it at the current epoch (learners that failed were
    /// reported and are not waited for any further).
    async fn replicate(&self, index: u64, slot: &Slot, op: &Mutation) -> Result<(), VolumeError> {
        let allocate = matches!(op, Mutation::Write { .. } | Mutation::Unmap { .. });
        let Some(own) = self.view(index, slot, allocate).await? else {
            // Flush of an extent this volume owns nothing of: nothing to do.
            return Ok(());
        };
        let extent = own.id;
        let mut set = own.set;
        // Which members and learners hold the mutation, at which epoch.
        let mut done: HashMap<ChunkId, u64> = HashMap::new();
        let mut last_failure = String::new();
        for attempt in 0..self.cfg.max_attempts {
            if set.members.is_empty() {
                return Err(VolumeError::Unavailable {
                    extent,
                    reason: "replica set has no members".into(),
                });
            }
            let epoch = set.epoch;
            // Meta's set once the watcher (`join_watching`) saw a newer one.
            let (newer_tx, newer_rx) = watch::channel::<Option<ReplicaSet>>(None);
            let calls = set.targets().map(|m| {
                let prior = done.get(m).copied();
                let extent = &extent;
                let mut newer = newer_rx.clone();
                async move {
                    let Some(peer) = self.peer(m) else {
                        return (
                            m.clone(),
                            Some(Err(PeerError::Unreachable("unknown chunk".into()))),
                        );
                    };
                    let work = async {
                        match prior {
                            Some(e) if e >= epoch => Ok(()),
                            // Already has it: only move its epoch forward.
                            Some(_) => self.call(&*peer, peer.fence(extent, epoch)).await,
                            None => match op {
                                Mutation::Write { offset, data, fua } => {
                                    self.call(
                                        &*peer,
                                        peer.write(extent, epoch, *offset, data.clone(), *fua),
                                    )
                                    .await
                                }
                                Mutation::Unmap { offset, len } => {
                                    self.call(&*peer, peer.unmap(extent, epoch, *offset, *len))
                                        .await
                                }
                                Mutation::Flush => self.call(&*peer, peer.flush(extent)).await,
                            },
                        }
                    };
                    // `None`: meta moved `m` out of the set while we waited.
                    let r = tokio::select! {
                        r = work => Some(r),
                        _ = left_set(&mut newer, m) => None,
                    };
                    (m.clone(), r)
                }
            });
            // Only this chunk's own copy to write (RF=1 here): nothing can
            // freeze, no watcher.
            let all_local = set
                .targets()
                .all(|m| self.local.as_ref().is_some_and(|l| l.chunk() == m));
            let results = if all_local {
                join_all(calls).await
            } else {
                self.join_watching(&extent, epoch, &newer_tx, join_all(calls))
                    .await
            };
            let mut stale = false;
            let mut left: Vec<ChunkId> = Vec::new();
            let mut failed: Vec<(ChunkId, PeerError)> = Vec::new();
            let mut learners_failed: Vec<(ChunkId, PeerError)> = Vec::new();
            for (m, r) in results {
                match r {
                    None => left.push(m),
                    Some(Ok(())) => {
                        done.insert(m, epoch);
                    }
                    Some(Err(PeerError::StaleEpoch { have, got })) => {
                        tracing::info!(extent = %extent, chunk = %m, have, got, op = op.name(), "replica has a newer epoch");
                        stale = true;
                    }
                    Some(Err(e)) if set.is_learner(&m) => learners_failed.push((m, e)),
                    Some(Err(e)) => failed.push((m, e)),
                }
            }
            if stale {
                set = self.refresh(&extent, slot).await?;
                continue;
            }
            let newer = newer_rx.borrow().clone();
            if let (false, Some(newer)) = (left.is_empty(), newer) {
                // Meta's newer set no longer has the chunks in `left` (it
                // removed them: declared dead, or reported by another access
                // point), so their answer is not needed: go on against the
                // newer set exactly as after a removal of our own. The next
                // round fences the holders to the new epoch and writes to
                // whoever lacks the mutation; only then is it acknowledged.
                set = self.install(slot, &extent, newer);
                for m in &left {
                    bump(&self.metrics.abandoned_calls);
                    tracing::warn!(extent = %extent, chunk = %m, epoch = set.epoch, op = op.name(), "meta moved the replica out of the set while its call waited; not waiting for it");
                    self.fence_removed(&extent, m, set.epoch);
                }
                // Failures of chunks that left need no report; a member that
                // became a learner (or the other way round) is simply sent
                // the mutation again in its new role.
                failed.retain(|(m, _)| set.contains(m));
                learners_failed.retain(|(m, _)| set.is_learner(m));
            }
            let holders =
                |set: &ReplicaSet| set.members.iter().filter(|m| done.contains_key(*m)).count();
            if !failed.is_empty() && holders(&set) == 0 {
                // No member of our view has it. The view may be old: a
                // learner that took the mutation may have been promoted
                // meanwhile (its copy completed). Fail only if meta's
                // current set has no holder either; otherwise go on
                // against that set.
                if let Some(newer) = self.newer_set(&extent, set.epoch).await {
                    tracing::info!(extent = %extent, epoch = newer.epoch, members = ?newer.members, op = op.name(), "no member of the old view holds the mutation; going on with meta's newer set");
                    set = self.install(slot, &extent, newer);
                    failed.retain(|(m, _)| set.contains(m));
                    learners_failed.retain(|(m, _)| set.is_learner(m));
                }
                if !failed.is_empty() && holders(&set) == 0 {
                    // Nobody has it: fail the command, leave membership
                    // alone.
                    return Err(classify(extent, &failed));
                }
            }
            // A failed learner is reported and forgotten: it never fails the
            // I/O (its recovery task is dropped by meta).
            for (m, e) in learners_failed {
                tracing::warn!(extent = %extent, chunk = %m, epoch = set.epoch, error = %e, op = op.name(), "learner failed; reporting it");
                set = self.remove(&extent, slot, &m, set.epoch).await?;
            }
            if failed.is_empty() {
                // Done if every member of the (possibly newer) set has it; a
                // learner promoted meanwhile may still need it. After a call
                // was abandoned, one more round first (fence to the new
                // epoch).
                if left.is_empty() && set.members.iter().all(|m| done.contains_key(m)) {
                    if attempt > 0 {
                        tracing::info!(extent = %extent, epoch, members = ?set.members, op = op.name(), "completed on the new set");
                    }
                    return Ok(());
                }
                continue;
            }
            for (m, e) in failed {
                tracing::warn!(extent = %extent, chunk = %m, epoch = set.epoch, error = %e, op = op.name(), "replica failed; removing it from the set");
                last_failure = format!("{m}: {e}");
                set = self.remove(&extent, slot, &m, set.epoch).await?;
            }
        }
        Err(VolumeError::Unavailable {
            extent,
            reason: format!(
                "gave up after {} attempts; last failure: {last_failure}",
                self.cfg.max_attempts
            ),
        })
    }

    /// Meta's set of `extent` if it is newer than `epoch` (a cached answer
    /// may be older: then asked once more, which fetches). `None` if not
    /// newer or meta cannot say.
    async fn newer_set(&self, extent: &ExtentId, epoch: u64) -> Option<ReplicaSet> {
        for _ in 0..2 {
            match self.membership.current(extent).await {
                Ok(Some(s)) if s.epoch > epoch => return Some(s),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(extent = %extent, error = %e, "could not ask meta for the current set");
                    return None;
                }
            }
        }
        None
    }

    /// Report `chunk` (member or learner) failed through meta, install the
    /// answer and fence the chunk off if it was removed.
    async fn remove(
        &self,
        extent: &ExtentId,
        slot: &Slot,
        chunk: &ChunkId,
        seen: u64,
    ) -> Result<ReplicaSet, VolumeError> {
        let set = self.membership.remove_member(extent, chunk, seen).await?;
        let set = self.install(slot, extent, set);
        if !set.holds(chunk) {
            bump(&self.metrics.member_removals);
            self.fence_removed(extent, chunk, set.epoch);
        }
        Ok(set)
    }

    /// Best effort, in the background: tell a removed member the new epoch,
    /// so an access point with the old view cannot write to it either.
    fn fence_removed(&self, extent: &ExtentId, chunk: &ChunkId, epoch: u64) {
        let Some(peer) = self.peer(chunk) else {
            return;
        };
        let extent = extent.clone();
        let timeout = self.cfg.peer_timeout;
        let span = tracing::debug_span!(parent: &self.span, "fence_removed", extent = %extent, chunk = %chunk, epoch);
        tokio::spawn(
            async move {
                match tokio::time::timeout(timeout, peer.fence(&extent, epoch)).await {
                    Ok(Ok(())) => tracing::info!("removed member fenced"),
                    Ok(Err(e)) => tracing::debug!(error = %e, "could not fence removed member"),
                    Err(_) => tracing::debug!("fencing removed member timed out"),
                }
            }
            .instrument(span),
        );
    }

    /// Read an aligned range of one extent, with failover and repair.
    async fn read_extent(
        &self,
        index: u64,
        slot: &Slot,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, VolumeError> {
        let Some(view) = self.read_view(index, slot).await? else {
            return Ok(Bytes::from(vec![0u8; len as usize]));
        };
        let extent = view.id;
        let mut set = view.set;
        for _ in 0..self.cfg.max_attempts {
            if set.members.is_empty() {
                return Err(VolumeError::Unavailable {
                    extent,
                    reason: "replica set has no members".into(),
                });
            }
            let mut order: Vec<&ChunkId> = Vec::with_capacity(set.members.len());
            if let Some(l) = &self.local {
                if set.contains(l.chunk()) {
                    order.push(l.chunk());
                }
            }
            order.extend(
                set.members
                    .iter()
                    .filter(|m| self.local.as_ref().is_none_or(|l| l.chunk() != *m)),
            );
            let mut bad: Vec<(Arc<dyn ReplicaPeer>, u64)> = Vec::new();
            let mut errors: Vec<(ChunkId, PeerError)> = Vec::new();
            let mut stale = false;
            let mut newer: Option<ReplicaSet> = None;
            for m in order {
                let Some(peer) = self.peer(m) else {
                    errors.push((m.clone(), PeerError::Unreachable("unknown chunk".into())));
                    continue;
                };
                // This chunk's own copy cannot be frozen behind a socket:
                // no watcher (it costs a channel and a timer per read).
                let local = self.local.as_ref().is_some_and(|l| l.chunk() == m);
                let watched = async {
                    if local {
                        return Ok(self
                            .call(&*peer, peer.read(&extent, set.epoch, offset, len))
                            .await);
                    }
                    let (newer_tx, mut newer_rx) = watch::channel::<Option<ReplicaSet>>(None);
                    let call = async {
                        tokio::select! {
                            r = self.call(&*peer, peer.read(&extent, set.epoch, offset, len)) => Ok(r),
                            s = left_set(&mut newer_rx, m) => Err(s),
                        }
                    };
                    self.join_watching(&extent, set.epoch, &newer_tx, call)
                        .await
                };
                let r = match watched.await {
                    Ok(r) => r,
                    Err(s) => {
                        // Meta moved it out of the set while we waited: read
                        // from the newer set instead.
                        bump(&self.metrics.abandoned_calls);
                        tracing::warn!(extent = %extent, chunk = %m, epoch = s.epoch, "meta moved the replica out of the set while a read waited; reading from the newer set");
                        newer = Some(s);
                        break;
                    }
                };
                match r {
                    Ok(data) => {
                        if !bad.is_empty() {
                            bump(&self.metrics.checksum_failovers);
                            for (b, block) in bad {
                                self.repair(&extent, b.as_ref(), set.epoch, offset, &data, block)
                                    .await;
                            }
                        }
                        return Ok(data);
                    }
                    Err(PeerError::Checksum { block }) => {
                        tracing::warn!(extent = %extent, chunk = %m, block, "copy failed its checksum; reading another member");
                        bad.push((peer, block));
                    }
                    // Also what a copy garbage collection retired answers
                    // (meta dropped that chunk from the set; see
                    // `store/retired.rs`): this view is older than the
                    // drop, so refresh and read the new set's members. A
                    // missing extent that is not retired reads as zeros
                    // (thin), and any other error only moves on to the
                    // next member of this same old view (with a one-member
                    // view, e.g. after an RF=1 move, the read would fail),
                    // which is why the collected copy must not answer
                    // NotFound-as-zeros or a plain error.
                    Err(PeerError::StaleEpoch { .. }) => {
                        stale = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(extent = %extent, chunk = %m, error = %e, "read failed; trying another member");
                        errors.push((m.clone(), e));
                    }
                }
            }
            if let Some(s) = newer {
                set = self.install(slot, &extent, s);
                continue;
            }
            if stale {
                set = self.refresh(&extent, slot).await?;
                continue;
            }
            if errors.is_empty() {
                return Err(VolumeError::Unreadable {
                    extent,
                    offset,
                    len,
                });
            }
            if !bad.is_empty() {
                // Some copies bad, the rest unreachable: still never serve
                // bad data.
                return Err(VolumeError::Unavailable {
                    extent,
                    reason: format!(
                        "{} copies failed their checksum, the others are unreachable",
                        bad.len()
                    ),
                });
            }
            return Err(classify(extent, &errors));
        }
        Err(VolumeError::Unavailable {
            extent,
            reason: "replica set kept changing".into(),
        })
    }

    /// Repair the bad copy on `peer` from `good` (the content of
    /// `[offset, offset+len)`), starting at the reported bad `block`, then
    /// re-reading the rest of the range from it to find further bad blocks.
    /// Best effort: failures are logged; the caller serves `good` anyway.
    async fn repair(
        &self,
        extent: &ExtentId,
        peer: &dyn ReplicaPeer,
        epoch: u64,
        offset: u64,
        good: &Bytes,
        mut block: u64,
    ) {
        let first = offset / BLOCK_SIZE;
        let end = (offset + good.len() as u64) / BLOCK_SIZE;
        while block >= first && block < end {
            let at = ((block - first) * BLOCK_SIZE) as usize;
            let data = good.slice(at..at + BLOCK_SIZE as usize);
            match self.call(peer, peer.repair(extent, block, data)).await {
                Ok(()) => {
                    bump(&self.metrics.repairs);
                    tracing::info!(extent = %extent, chunk = %peer.chunk(), block, "bad block repaired from another member");
                }
                Err(e) => {
                    tracing::warn!(extent = %extent, chunk = %peer.chunk(), block, error = %e, "repair failed");
                    return;
                }
            }
            let next = block + 1;
            if next >= end {
                return;
            }
            match self
                .call(
                    peer,
                    peer.read(extent, epoch, next * BLOCK_SIZE, (end - next) * BLOCK_SIZE),
                )
                .await
            {
                Err(PeerError::Checksum { block: b }) if b > block => block = b,
                _ => return,
            }
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check(offset, buf.len() as u64)?;
        bump(&self.metrics.reads);
        self.metrics
            .io_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let parts = self.parts(offset, buf.len() as u64);
        // Hand each part its own disjoint piece of `buf`.
        let mut pieces = Vec::with_capacity(parts.len());
        let mut rest = buf;
        for p in &parts {
            let (head, tail) = rest.split_at_mut(p.len as usize);
            pieces.push((*p, head));
            rest = tail;
        }
        let results = join_all(pieces.into_iter().map(|(p, piece)| async move {
            let slot = self.slot(p.index);
            let a0 = round_down(p.offset);
            let a1 = round_up(p.offset + p.len);
            let data = self.read_extent(p.index, &slot, a0, a1 - a0).await?;
            let from = (p.offset - a0) as usize;
            piece.copy_from_slice(&data[from..from + p.len as usize]);
            Ok::<(), VolumeError>(())
        }))
        .await;
        results.into_iter().collect()
    }

    async fn write(
        self: &Arc<Self>,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check(offset, data.len() as u64)?;
        bump(&self.metrics.writes);
        self.metrics
            .io_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let all = Bytes::copy_from_slice(data);
        let parts = self.parts(offset, data.len() as u64);
        // Each part runs in its own task so a cancelled command cannot leave
        // a mutation half-applied across the replicas.
        let mut tasks = Vec::with_capacity(parts.len());
        for p in parts {
            let me = self.clone();
            let data = all.slice(p.buf_offset..p.buf_offset + p.len as usize);
            // Held by the task, so invalidate() waits for it even if the
            // command is cancelled.
            let gate = self.gate.clone().read_owned().await;
            tasks.push(tokio::spawn(
                async move {
                    let r = me.write_part(p.index, p.offset, data, fua).await;
                    drop(gate);
                    r
                }
                .instrument(tracing::Span::current()),
            ));
        }
        let mut first_err = None;
        for t in tasks {
            let r = t
                .await
                .map_err(|e| VolumeError::Internal(format!("write task failed: {e}")))
                .and_then(|r| r);
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Write `data` at byte `offset` of extent `index` (any 512-aligned
    /// range), merging partial 4 KiB blocks.
    async fn write_part(
        &self,
        index: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let slot = self.slot(index);
        let end = offset + data.len() as u64;
        let a0 = round_down(offset);
        let a1 = round_up(end);
        let _guard = lock_range(&slot, a0, a1).await;
        let payload = if a0 == offset && a1 == end {
            data
        } else {
            let mut buf = vec![0u8; (a1 - a0) as usize];
            let bs = BLOCK_SIZE as usize;
            if a0 != offset {
                bump(&self.metrics.rmw_reads);
                let head = self.read_extent(index, &slot, a0, BLOCK_SIZE).await?;
                buf[..bs].copy_from_slice(&head);
            }
            let tail_block = a1 - BLOCK_SIZE;
            if a1 != end && !(a0 != offset && tail_block == a0) {
                bump(&self.metrics.rmw_reads);
                let tail = self
                    .read_extent(index, &slot, tail_block, BLOCK_SIZE)
                    .await?;
                let at = buf.len() - bs;
                buf[at..].copy_from_slice(&tail);
            }
            let at = (offset - a0) as usize;
            buf[at..at + data.len()].copy_from_slice(&data);
            Bytes::from(buf)
        };
        self.replicate(
            index,
            &slot,
            &Mutation::Write {
                offset: a0,
                data: payload,
                fua,
            },
        )
        .await?;
        if !fua {
            // After the data is on every member, so a flush that clears the
            // flag later covers this write.
            slot.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), VolumeError> {
        bump(&self.metrics.flushes);
        let dirty: Vec<(u64, Arc<Slot>)> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .iter()
                    .filter(|(_, slot)| slot.dirty.load(Ordering::Acquire))
                    .map(|(i, slot)| (*i, slot.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let results = join_all(dirty.into_iter().map(|(index, slot)| async move {
            if !slot.dirty.swap(false, Ordering::AcqRel) {
                return Ok(());
            }
            let r = self.replicate(index, &slot, &Mutation::Flush).await;
            if r.is_err() {
                slot.dirty.store(true, Ordering::Release);
            }
            r
        }))
        .await;
        results.into_iter().collect()
    }

    async fn unmap(self: &Arc<Self>, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check(offset, len)?;
        bump(&self.metrics.unmaps);
        let _gate = self.gate.read().await;
        for p in self.parts(offset, len) {
            let slot = self.slot(p.index);
            if self.read_view(p.index, &slot).await?.is_none() {
                continue; // never written: already reads as zeros
            }
            let end = p.offset + p.len;
            let i0 = round_up(p.offset);
            let i1 = round_down(end);
            if i0 < i1 {
                let _guard = lock_range(&slot, i0, i1).await;
                self.replicate(
                    p.index,
                    &slot,
                    &Mutation::Unmap {
                        offset: i0,
                        len: i1 - i0,
                    },
                )
                .await?;
            }
            // Partial blocks at the edges are zero-filled.
            let mut edges = Vec::new();
            if i0 >= i1 {
                edges.push((p.offset, end));
            } else {
                if p.offset < i0 {
                    edges.push((p.offset, i0));
                }
                if i1 < end {
                    edges.push((i1, end));
                }
            }
            for (s, e) in edges {
                let zeros = Bytes::from(vec![0u8; (e - s) as usize]);
                self.write_part(p.index, s, zeros, false).await?;
            }
        }
        Ok(())
    }

    async fn lba_status(&self, lba: u64) -> Result<(bool, u64), VolumeError> {
        let bs = u64::from(self.cfg.logical_block_size);
        let size = self.size.load(Ordering::Acquire);
        let total = size / bs;
        if lba >= total {
            return Err(VolumeError::OutOfRange {
                offset: lba.saturating_mul(bs),
                len: bs,
                size,
            });
        }
        let es = self.cfg.extent_size;
        let pos = lba * bs;
        let mut index = pos / es;
        let slot = self.slot(index);
        let mapped = self.read_view(index, &slot).await?.is_some();
        let mut end = ((index + 1) * es).min(size);
        if !mapped {
            // Extend over following unallocated extents (bounded).
            let last = (size.saturating_sub(1)) / es;
            let stop = last.min(index + LBA_STATUS_SCAN_EXTENTS);
            while index < stop {
                let next = index + 1;
                let s = self.slot(next);
                if self.read_view(next, &s).await?.is_some() {
                    break;
                }
                index = next;
                end = ((index + 1) * es).min(size);
            }
        }
        Ok((mapped, ((end - pos) / bs).max(1)))
    }
}

/// The error for "every member failed" (nothing acknowledged).
fn classify(extent: ExtentId, failed: &[(ChunkId, PeerError)]) -> VolumeError {
    let reason = failed
        .iter()
        .map(|(m, e)| format!("{m}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    if !failed.is_empty() && failed.iter().all(|(_, e)| *e == PeerError::NoSpace) {
        VolumeError::NoSpace { extent }
    } else if failed
        .iter()
        .any(|(_, e)| matches!(e, PeerError::Unreachable(_)))
    {
        VolumeError::Unavailable { extent, reason }
    } else {
        VolumeError::Failed { extent, reason }
    }
}

#[async_trait]
impl BlockDevice for VolumeDevice {
    fn block_size(&self) -> u32 {
        self.inner.cfg.logical_block_size
    }

    fn num_blocks(&self) -> u64 {
        self.size_bytes() / u64::from(self.inner.cfg.logical_block_size)
    }

    fn identity(&self) -> DeviceIdentity {
        self.inner.cfg.identity.clone()
    }

    fn thin(&self) -> bool {
        self.inner.cfg.thin
    }

    fn write_cache(&self) -> bool {
        true
    }

    async fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let bs = u64::from(self.inner.cfg.logical_block_size);
        self.read_bytes(lba.saturating_mul(bs), buf)
            .await
            .map_err(|e| e.into_device(false))
    }

    async fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        let bs = u64::from(self.inner.cfg.logical_block_size);
        self.write_bytes(lba.saturating_mul(bs), data, fua)
            .await
            .map_err(|e| e.into_device(true))
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.flush_all().await.map_err(|e| e.into_device(true))
    }

    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        let bs = u64::from(self.inner.cfg.logical_block_size);
        self.unmap_bytes(lba.saturating_mul(bs), blocks.saturating_mul(bs))
            .await
            .map_err(|e| e.into_device(true))
    }

    async fn lba_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        let span = tracing::debug_span!(parent: &self.inner.span, "lba_status", lba);
        self.inner
            .lba_status(lba)
            .instrument(span)
            .await
            .map_err(|e| e.into_device(false))
    }
}
