//! Copy-on-write at extent granularity.
//!
//! Extent records are keyed by (owner volume, index, generation). A volume at
//! generation `G` reads extent `i` from its newest *committed* record with a
//! generation `<= G`; without one, a clone reads its parent snapshot's view
//! (the parent volume's newest committed record with a generation `<=` the
//! snapshot's), recursively; nothing at all means never written (zeros). A
//! snapshot owns no records: it is a frozen generation of its volume.
//!
//! A volume writes extent `i` in place only when it owns a committed record
//! of its current generation. Otherwise a write first needs:
//! - nothing resolved: [`State::ensure_extent`] places a fresh record (thin
//!   volumes and clones are placed lazily this way);
//! - data resolved: [`State::copy_up_extent`] creates a PENDING record of the
//!   current generation on the source's chunks; the writer has every member
//!   copy the source locally, then [`State::commit_copy_up`] clears pending
//!   (and bumps the epoch, so a late copy of the same destination is fenced
//!   off by the replicas). Until then reads resolve past the pending record,
//!   and a repeated copy-up returns the same record.
//!
//! Deleting a snapshot drops the records of its volume that no remaining
//! view (the live volume, another snapshot, and through those every clone)
//! resolves to ([`State::unreachable_extent_ops`]).

use std::collections::BTreeSet;

use tracing::{info, warn};

use super::{
    extent_count, ExtentKey, ExtentRecord, MetaError, Op, Result, State, Uuid, VolumeKey,
    VolumeRecord,
};

/// Bound on clone-of-a-clone chains walked while resolving (a cycle is
/// impossible by construction; this only guards against corrupt records).
const MAX_CLONE_DEPTH: usize = 256;

/// Where a volume reads one extent index from and what it may write.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedExtent {
    /// The record reads resolve to (possibly an older generation or a clone
    /// parent's record); `None`: never written, zeros.
    pub read: Option<ExtentRecord>,
    /// The volume's own committed record of its current generation (then
    /// equal to `read`); `None`: a write needs EnsureExtent or a copy-up.
    pub own: Option<ExtentRecord>,
}

/// The extent's name on the chunks: the volume id for generation 0,
/// `<volume id>.g<generation>` otherwise.
pub fn store_key(volume: &Uuid, generation: u64) -> String {
    if generation == 0 {
        volume.to_string()
    } else {
        format!("{volume}.g{generation}")
    }
}

/// Inverse of [`store_key`].
pub fn parse_store_key(key: &str) -> Result<(Uuid, u64)> {
    let bad = || MetaError::InvalidArgument(format!("{key:?} is not an extent store key"));
    match key.split_once(".g") {
        None => Ok((Uuid::parse(key).map_err(|_| bad())?, 0)),
        Some((v, g)) => {
            let generation: u64 = g.parse().map_err(|_| bad())?;
            if generation == 0 {
                return Err(bad());
            }
            Ok((Uuid::parse(v).map_err(|_| bad())?, generation))
        }
    }
}

impl ExtentRecord {
    /// The in-memory key: (volume, index, generation).
    pub fn key(&self) -> ExtentKey {
        (self.volume, self.index, self.generation)
    }

    /// The extent's name on the chunks (see [`store_key`]).
    pub fn store_key(&self) -> String {
        store_key(&self.volume, self.generation)
    }
}

impl State {
    /// The newest committed record of `volume` at `index` with a generation
    /// `<= max_gen`.
    pub(super) fn newest_committed(
        &self,
        volume: Uuid,
        index: u64,
        max_gen: u64,
    ) -> Option<&ExtentRecord> {
        self.extents
            .range((volume, index, 0)..=(volume, index, max_gen))
            .rev()
            .map(|(_, e)| e)
            .find(|e| !e.pending)
    }

    /// What `volume` at generation `max_gen` reads at `index`, following
    /// clone parents.
    fn resolve_read(
        &self,
        volume: &VolumeRecord,
        index: u64,
        max_gen: u64,
    ) -> Option<ExtentRecord> {
        let mut vol = volume;
        let mut gen = max_gen;
        for _ in 0..MAX_CLONE_DEPTH {
            if let Some(e) = self.newest_committed(vol.id, index, gen) {
                return Some(e.clone());
            }
            let snap = vol.parent_snapshot.and_then(|s| self.snapshots.get(&s))?;
            if index >= extent_count(snap.size_bytes) {
                // Beyond the snapshot: the clone grew; never written.
                return None;
            }
            vol = self.volumes.get(&snap.volume)?;
            gen = snap.generation;
        }
        warn!(volume = %volume.id, index, "clone chain too deep; treating extent as unwritten");
        None
    }

    fn volume_and_index(&self, volume_id: &str, index: u64) -> Result<VolumeRecord> {
        let v = self.get_volume(VolumeKey::Id(volume_id))?;
        let n = extent_count(v.size_bytes);
        if index >= n {
            return Err(MetaError::InvalidArgument(format!(
                "extent {index} is beyond volume {} ({n} extents)",
                v.name
            )));
        }
        Ok(v)
    }

    /// Where the volume reads extent `index` from and whether it owns a
    /// writable extent there. No change.
    pub fn resolve_extent(&self, volume_id: &str, index: u64) -> Result<ResolvedExtent> {
        let v = self.volume_and_index(volume_id, index)?;
        let read = self.resolve_read(&v, index, v.generation);
        let own = read
            .clone()
            .filter(|e| e.volume == v.id && e.generation == v.generation);
        Ok(ResolvedExtent { read, own })
    }

    /// The volume's writable extent `index` (current generation), placing it
    /// first if nothing is resolved there. FAILED_PRECONDITION if its data
    /// must be copied up first (or a copy-up is pending). Idempotent.
    pub fn ensure_extent(&mut self, volume_id: &str, index: u64) -> Result<ExtentRecord> {
        let v = self.volume_and_index(volume_id, index)?;
        if let Some(e) = self.extents.get(&(v.id, index, v.generation)) {
            if e.pending {
                return Err(MetaError::FailedPrecondition(format!(
                    "extent {index} of volume {} has a copy-up in progress; use CopyUpExtent",
                    v.name
                )));
            }
            return Ok(e.clone());
        }
        if let Some(src) = self.resolve_read(&v, index, v.generation) {
            return Err(MetaError::FailedPrecondition(format!(
                "extent {index} of volume {} must be copied up from {} first; use CopyUpExtent",
                v.name,
                src.store_key()
            )));
        }
        self.place_own(&v, index)
    }

    /// Place a fresh, committed record of the volume's current generation.
    fn place_own(&mut self, v: &VolumeRecord, index: u64) -> Result<ExtentRecord> {
        let set = self
            .place(1, v.replicas, v.thin, self.locality_home(v))?
            .pop()
            .ok_or_else(|| MetaError::FailedPrecondition("placement found no chunks".into()))?;
        let e = ExtentRecord {
            volume: v.id,
            index,
            replicas: set,
            epoch: 1,
            learners: Vec::new(),
            generation: v.generation,
            pending: false,
            replication: v.replicas,
        };
        self.commit(vec![Op::Extent(e.clone())])?;
        info!(volume = %v.id, index, generation = v.generation, replicas = ?e.replicas, "extent placed on first write");
        Ok(e)
    }

    /// Start (or resume) a copy-up of extent `index`: returns the source (the
    /// resolved read extent) and the destination of the current generation.
    /// A new destination is PENDING and placed on the source's chunks (up to
    /// the volume's replication factor), so every member copies locally.
    /// Idempotent: a pending destination is returned as is. If the volume
    /// already owns a committed extent it is returned (not pending: nothing
    /// to copy); if nothing is resolved, a fresh extent is placed as by
    /// [`State::ensure_extent`] and returned without a source.
    pub fn copy_up_extent(
        &mut self,
        volume_id: &str,
        index: u64,
    ) -> Result<(Option<ExtentRecord>, ExtentRecord)> {
        let v = self.volume_and_index(volume_id, index)?;
        let source = self.resolve_read(&v, index, v.generation);
        if let Some(e) = self.extents.get(&(v.id, index, v.generation)) {
            return Ok((source, e.clone()));
        }
        let Some(src) = source else {
            let e = self.place_own(&v, index)?;
            return Ok((None, e));
        };
        if src.replicas.is_empty() {
            return Err(MetaError::FailedPrecondition(format!(
                "extent {index} of volume {}: the copy-up source {} has no live replica",
                v.name,
                src.store_key()
            )));
        }
        let mut replicas = src.replicas.clone();
        replicas.truncate(v.replicas as usize);
        let dst = ExtentRecord {
            volume: v.id,
            index,
            replicas,
            epoch: 1,
            learners: Vec::new(),
            generation: v.generation,
            pending: true,
            replication: v.replicas,
        };
        self.commit(vec![Op::Extent(dst.clone())])?;
        info!(volume = %v.id, index, from = %src.store_key(), to = %dst.store_key(),
              replicas = ?dst.replicas, "copy-up started");
        Ok((Some(src), dst))
    }

    /// Finish a copy-up: the pending destination `store_key` of extent
    /// `index` becomes the volume's extent (epoch + 1). Idempotent.
    pub fn commit_copy_up(
        &mut self,
        volume_id: &str,
        index: u64,
        store_key: &str,
    ) -> Result<ExtentRecord> {
        let v = self.volume_and_index(volume_id, index)?;
        let (owner, generation) = parse_store_key(store_key)?;
        if owner != v.id {
            return Err(MetaError::InvalidArgument(format!(
                "store key {store_key} does not belong to volume {}",
                v.id
            )));
        }
        let e = self
            .extents
            .get(&(v.id, index, generation))
            .cloned()
            .ok_or_else(|| MetaError::NotFound(format!("extent {store_key}/{index}")))?;
        if !e.pending {
            return Ok(e);
        }
        let e2 = ExtentRecord {
            pending: false,
            epoch: e.epoch + 1,
            ..e
        };
        self.commit(vec![Op::Extent(e2.clone())])?;
        info!(volume = %v.id, index, extent = %store_key, epoch = e2.epoch, "copy-up committed");
        // A destination shorter than the replication factor is re-replicated.
        self.reconcile()?;
        Ok(e2)
    }

    /// Ops deleting every record of `volume` that no view resolves to any
    /// more once snapshot `dropping` is gone (and their recovery tasks). The
    /// views are the live volume (plus its pending copy-ups) and its other
    /// snapshots; clones resolve through their parent snapshot, which cannot
    /// be deleted while they exist.
    pub(super) fn unreachable_extent_ops(&self, volume: &VolumeRecord, dropping: Uuid) -> Vec<Op> {
        let mut views: Vec<u64> = self
            .snapshots
            .values()
            .filter(|s| s.volume == volume.id && s.id != dropping)
            .map(|s| s.generation)
            .collect();
        views.push(volume.generation);
        let mut keep: BTreeSet<ExtentKey> = BTreeSet::new();
        let records: Vec<&ExtentRecord> = self
            .extents
            .range((volume.id, 0, 0)..=(volume.id, u64::MAX, u64::MAX))
            .map(|(_, e)| e)
            .collect();
        for e in &records {
            if e.pending && e.generation == volume.generation {
                keep.insert(e.key());
            }
        }
        let indexes: BTreeSet<u64> = records.iter().map(|e| e.index).collect();
        for index in indexes {
            for g in &views {
                if let Some(e) = self.newest_committed(volume.id, index, *g) {
                    keep.insert(e.key());
                }
            }
        }
        let mut ops = Vec::new();
        for e in records {
            let k = e.key();
            if keep.contains(&k) {
                continue;
            }
            ops.push(Op::DelExtent(e.volume, e.index, e.generation));
            for t in self
                .tasks
                .values()
                .filter(|t| (t.volume, t.index, t.generation) == k)
            {
                ops.push(Op::DelTask(t.id));
            }
        }
        ops
    }
}

#[cfg(test)]
mod tests;
