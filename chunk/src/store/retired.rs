//! Tombstones of *retired* extents: copies garbage collection deleted
//! because meta no longer places them on this chunk (a lowered replication
//! factor, a drain, rebalance or locality move, a chunk declared dead).
//!
//! A missing extent normally reads as zeros (thin: never written here) and
//! is created by the first write, fence or unmap. For a retired copy that
//! would be wrong: an access point still on a view from before the drop
//! (its chunk has not applied the revision yet, or a read was already in
//! flight) would read zeros instead of the data, and a stale write would
//! re-create a partial copy. So the collection remembers, per retired
//! extent, the epoch meta's record had when it was retired (the record no
//! longer listing this chunk). A view that still names this chunk is older
//! than that epoch, and meta only places the extent here again with a newer
//! one. Until then a retired extent behaves like an empty extent fenced at
//! that epoch:
//! - a read at that epoch or older gets [`StoreError::StaleEpoch`] (through
//!   [`crate::replica::LocalPeer`], locally and over the replica
//!   transport), so the access point refreshes its set from meta and reads
//!   a member that holds the data;
//! - creating it at that epoch or older (a stale write, fence or unmap, a
//!   copy-up onto it) is refused the same way; a newer epoch (meta made
//!   this chunk a learner or member again) creates it and forgets the
//!   tombstone;
//! - a copy-up from it is refused (it is not "never written").
//!
//! Tombstones live in memory for [`RETIRED_TTL`]: a view of the old set
//! does not survive that long (every chunk drops its views when it applies
//! the revision that dropped the copy, and a chunk that cannot reach meta
//! fences its I/O after the liveness timeout).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{ExtentId, ExtentStore, Inner, Result, StoreError};
use tracing::Instrument;

/// How long a retired extent's tombstone is kept.
pub const RETIRED_TTL: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Table {
    /// Extent -> (fencing epoch, retired at).
    map: HashMap<ExtentId, (u64, Instant)>,
    last_prune: Instant,
}

/// The tombstones of one store.
#[derive(Debug)]
pub(super) struct Retired {
    table: Mutex<Table>,
    ttl: Duration,
}

impl Retired {
    pub(super) fn new(ttl: Duration) -> Retired {
        Retired {
            table: Mutex::new(Table {
                map: HashMap::new(),
                last_prune: Instant::now(),
            }),
            ttl,
        }
    }

    /// Remember `id` as retired at `epoch` (a higher epoch already there
    /// stays).
    fn insert(&self, id: ExtentId, epoch: u64, now: Instant) {
        let mut t = self.table.lock();
        if now.saturating_duration_since(t.last_prune) >= self.ttl / 4 {
            let ttl = self.ttl;
            t.map
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
            t.last_prune = now;
        }
        let e = t.map.entry(id).or_insert((epoch, now));
        *e = (e.0.max(epoch), now);
    }

    /// The fencing epoch of `id` if it is retired (and not expired).
    fn epoch(&self, id: &ExtentId, now: Instant) -> Option<u64> {
        let t = self.table.lock();
        let (epoch, at) = t.map.get(id)?;
        (now.saturating_duration_since(*at) < self.ttl).then_some(*epoch)
    }

    /// The fencing epoch of `id` now, if it is retired.
    pub(super) fn epoch_now(&self, id: &ExtentId) -> Option<u64> {
        self.epoch(id, Instant::now())
    }

    /// May `id` be created at `epoch`? Refused (stale) at or below a
    /// retired extent's epoch; a newer epoch forgets the tombstone.
    pub(super) fn check_create(&self, id: &ExtentId, epoch: u64) -> Result<()> {
        self.check_create_at(id, epoch, Instant::now())
    }

    fn check_create_at(&self, id: &ExtentId, epoch: u64, now: Instant) -> Result<()> {
        let mut t = self.table.lock();
        let Some((have, at)) = t.map.get(id).copied() else {
            return Ok(());
        };
        if now.saturating_duration_since(at) < self.ttl && have >= epoch {
            return Err(StoreError::StaleEpoch { have, got: epoch });
        }
        t.map.remove(id);
        Ok(())
    }

    /// Tombstones held (expired ones included until the next prune).
    fn len(&self) -> usize {
        self.table.lock().map.len()
    }
}

impl ExtentStore {
    /// Garbage collection of a copy meta no longer places here: delete
    /// `id` (as [`ExtentStore::delete_extent_if_unchanged`]) only if its
    /// change stamp is still `stamp`, and if so remember it as retired at
    /// `epoch` (meta's epoch of the record that dropped this chunk; see
    /// the module docs of `store/retired.rs`). `Ok(false)`: changed since,
    /// or gone.
    pub async fn retire_extent_if_unchanged(
        &self,
        id: &ExtentId,
        stamp: u64,
        epoch: u64,
    ) -> Result<bool> {
        let id = id.clone();
        let span = tracing::debug_span!("retire_extent_if_unchanged", extent = %id, stamp, epoch);
        self.blocking(move |s| s.delete_if_unchanged(&id, stamp, Some(epoch)))
            .instrument(span)
            .await
    }

    /// The epoch a retired extent is fenced at: `Some` while `id` is
    /// missing because garbage collection retired it (see
    /// [`ExtentStore::retire_extent_if_unchanged`]) and was not created
    /// again since.
    pub fn retired_epoch(&self, id: &ExtentId) -> Option<u64> {
        self.inner.retired.epoch_now(id)
    }

    /// Tombstones of retired extents held in memory.
    pub fn retired_count(&self) -> u64 {
        self.inner.retired.len() as u64
    }
}

impl Inner {
    /// Called by `delete_if_unchanged` with the extent removed from the
    /// map and the admin lock held (creation takes it too), so no create
    /// slips in between the removal and the tombstone.
    pub(super) fn tombstone(&self, id: &ExtentId, epoch: u64) {
        self.retired.insert(id.clone(), epoch, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_fence_until_a_newer_epoch_or_expiry() {
        let r = Retired::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ExtentId::new("vol", 0);
        let b = ExtentId::new("vol", 1);
        assert_eq!(r.epoch(&a, t0), None);
        assert!(r.check_create_at(&a, 1, t0).is_ok());
        r.insert(a.clone(), 7, t0);
        // A lower epoch never lowers the fence.
        r.insert(a.clone(), 5, t0);
        assert_eq!(r.epoch(&a, t0), Some(7));
        assert_eq!(r.epoch(&b, t0), None);
        for got in [1, 7] {
            match r.check_create_at(&a, got, t0) {
                Err(StoreError::StaleEpoch { have: 7, got: g }) => assert_eq!(g, got),
                other => panic!("create at {got}: {other:?}"),
            }
        }
        // A newer epoch: placed here again; the tombstone is gone.
        assert!(r.check_create_at(&a, 8, t0).is_ok());
        assert_eq!(r.epoch(&a, t0), None);
        assert!(r.check_create_at(&a, 1, t0).is_ok());
        // Expiry: not fenced any more, and pruned by a later insert.
        r.insert(b.clone(), 3, t0);
        let late = t0 + Duration::from_secs(61);
        assert_eq!(r.epoch(&b, late), None);
        assert!(r.check_create_at(&b, 2, late).is_ok());
        r.insert(b.clone(), 3, t0);
        assert_eq!(r.len(), 1);
        r.insert(a.clone(), 1, late);
        assert_eq!(r.len(), 1, "the expired tombstone of b was pruned");
        assert_eq!(r.epoch(&a, late), Some(1));
    }
}
