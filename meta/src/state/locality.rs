//! Data locality for RF=1 volumes: the data follows the chunk that serves
//! the volume's I/O.
//!
//! Every chunk is an access point for every volume, so an initiator logged
//! in to chunk A reads an RF=1 extent placed on chunk B through one more
//! network round trip (A forwards to B). Hyperconverged stores keep a
//! volume's data where its consumer runs; ironblock learns where that is:
//!
//! - Chunks report, with each heartbeat, the bytes of iSCSI I/O they served
//!   per volume (cumulative counters since the chunk started).
//! - Meta adds the increments per (volume, chunk) into a window. Once the
//!   window holds [`Options::locality_window_bytes`], the chunk that served
//!   at least [`LOCALITY_SHARE_PCT`] percent of it becomes the volume's
//!   *home*; a window without such a chunk (I/O through several portals)
//!   clears the home, unless the current home still served more than
//!   [`LOCALITY_KEEP_PCT`] percent of it ([`next_home`]). The window then
//!   restarts. Homes are persisted (tree `volume_home`), so a meta restart
//!   does not undo placement.
//! - While an RF=1 volume has a home that is alive and below
//!   [`LOCALITY_MAX_FILL_PCT`] full, the rebalance pass queues moves (the
//!   ordinary learner + `replaces` tasks, bounded by
//!   [`super::MAX_REBALANCE_MOVES`]) that bring the volume's extents to the
//!   home, new extents of the volume are placed there, and the count
//!   balancer leaves the extents on their home alone (it moves other
//!   replicas instead). A chunk above [`MAX_FILL_PCT`] takes no move at
//!   all, and as a home pins nothing, so capacity still wins over locality.
//!
//! Volumes with more replicas are left to placement and the balancer: their
//! reads are served by the local copy whenever the access chunk holds one.

use std::collections::{BTreeSet, HashMap};

use tracing::info;

use super::{
    ChunkState, ExtentKey, ExtentRecord, Op, RecoveryTask, Result, State, Uuid, VolumeRecord,
    EXTENT_SIZE,
};

/// Default [`super::Options::locality_window_bytes`]: 256 MiB of I/O (a
/// minute of 1k IOPS at 4 KiB, a quarter second of streaming) decides a
/// home; 0 turns locality off.
pub const DEFAULT_LOCALITY_WINDOW_BYTES: u64 = 256 << 20;
/// Share of a window's bytes one chunk must have served to become home.
pub const LOCALITY_SHARE_PCT: u64 = 90;
/// A chunk fuller than this (used bytes of its capacity) takes no move
/// (locality or balancing), and as a home pins nothing.
pub const MAX_FILL_PCT: u64 = 85;

/// Share of a window the current home must have served, strictly more
/// than this, to stay home when no chunk reaches [`LOCALITY_SHARE_PCT`]
/// (hysteresis: a short burst of I/O through another portal, a verify or a
/// backup read, does not drop the home and bounce its extents to the
/// balancer and back).
pub const LOCALITY_KEEP_PCT: u64 = 50;

/// The home after a full window (`window`: bytes per chunk): the chunk that
/// served at least [`LOCALITY_SHARE_PCT`] percent becomes (or stays) home;
/// else `current` stays while it served more than [`LOCALITY_KEEP_PCT`]
/// percent; else no home.
pub fn next_home(current: Option<u64>, window: &HashMap<u64, u64>) -> Option<u64> {
    let sum: u128 = window.values().map(|b| u128::from(*b)).sum();
    if sum == 0 {
        return current;
    }
    let share = |b: u64| u128::from(b) * 100;
    let top = window
        .iter()
        .max_by_key(|(c, b)| (**b, **c))
        .map(|(c, b)| (*c, *b));
    if let Some((c, b)) = top {
        if share(b) >= sum * u128::from(LOCALITY_SHARE_PCT) {
            return Some(c);
        }
    }
    current.filter(|h| {
        share(window.get(h).copied().unwrap_or(0)) > sum * u128::from(LOCALITY_KEEP_PCT)
    })
}

/// What meta has seen of one volume's I/O (memory only).
#[derive(Debug, Default)]
pub(super) struct Access {
    /// Last cumulative byte counter per chunk.
    last: HashMap<u64, u64>,
    /// Bytes per chunk since the window started.
    window: HashMap<u64, u64>,
}

impl State {
    /// Feed one heartbeat's per-volume I/O counters of `chunk`
    /// (`(volume id, bytes served since the chunk started)`). Unknown or
    /// malformed volume ids are ignored (the volume may just have been
    /// deleted). Commits home changes and reconciles after them.
    pub fn note_access(&mut self, chunk: u64, served: &[(String, u64)]) -> Result<()> {
        let window_bytes = self.opts.locality_window_bytes;
        if window_bytes == 0 {
            return Ok(());
        }
        let mut ops = Vec::new();
        for (vol, total) in served {
            let Ok(id) = Uuid::parse(vol) else { continue };
            if !self.volumes.contains_key(&id) {
                continue;
            }
            let a = self.access.entry(id).or_default();
            let last = a.last.insert(chunk, *total).unwrap_or(0);
            // A counter that went back means the chunk restarted.
            let delta = if *total >= last { total - last } else { *total };
            *a.window.entry(chunk).or_insert(0) += delta;
            let sum: u64 = a.window.values().sum();
            if sum < window_bytes {
                continue;
            }
            let current = self.homes.get(&id).copied();
            let home = next_home(current, &a.window);
            a.window.clear();
            if current != home {
                info!(volume = %id, home = ?home, window_bytes = sum, "volume home changed");
                ops.push(Op::Home(id, home));
            }
        }
        if !ops.is_empty() {
            self.commit(ops)?;
            self.reconcile()?;
        }
        Ok(())
    }

    /// The chunk volume `v`'s data should live on, if locality applies:
    /// RF=1, a home that is alive and not above the fill bound.
    pub(super) fn locality_home(&self, v: &VolumeRecord) -> Option<u64> {
        if v.replicas != 1 || self.opts.locality_window_bytes == 0 {
            return None;
        }
        let home = *self.homes.get(&v.id)?;
        let c = self.chunks.get(&home)?;
        if c.state != ChunkState::Alive {
            return None;
        }
        self.fill_ok(home, 0).then_some(home)
    }

    /// Whether `chunk` stays within [`MAX_FILL_PCT`] after taking `extra`
    /// more bytes (unknown chunks never do).
    pub(super) fn fill_ok(&self, chunk: u64, extra: u64) -> bool {
        let Some(c) = self.chunks.get(&chunk) else {
            return false;
        };
        let used = super::pulse::lock(&self.pulse)
            .live
            .get(&chunk)
            .map(|l| l.used_bytes)
            .unwrap_or(0);
        u128::from(used) * 100 + u128::from(extra) * 100
            <= u128::from(c.capacity_bytes) * MAX_FILL_PCT as u128
    }

    /// The learned home of a volume (whether or not locality applies now).
    pub fn volume_home(&self, id: &Uuid) -> Option<u64> {
        self.homes.get(id).copied()
    }

    /// Whether extent `e`'s replica on `chunk` stays where it is because
    /// that chunk is its volume's home.
    pub(super) fn pinned(&self, e: &ExtentRecord, chunk: u64) -> bool {
        e.replication == 1
            && self
                .volumes
                .get(&e.volume)
                .and_then(|v| self.locality_home(v))
                == Some(chunk)
    }

    /// Queue moves that bring homed RF=1 volumes' extents to their home,
    /// while fewer than `budget` are queued. Skips extents in `busy` (a task
    /// runs) and adds the ones it moves; `load` is updated. Returns the ops
    /// and the number of moves.
    pub(super) fn locality_moves(
        &self,
        budget: usize,
        busy: &mut BTreeSet<ExtentKey>,
        load: &mut HashMap<u64, u64>,
        cluster: &mut super::ClusterRecord,
        ops: &mut Vec<Op>,
    ) -> usize {
        let now = std::time::Instant::now();
        if self.homes.is_empty() {
            return 0;
        }
        // Walks every extent: computed only when a thick move needs it.
        let mut reserved: Option<HashMap<u64, u64>> = None;
        // Thick bytes each home takes on in this pass.
        let mut taking: HashMap<u64, u64> = HashMap::new();
        let mut queued = 0;
        for e in self.extents.values() {
            if queued >= budget {
                break;
            }
            let Some(v) = self.volumes.get(&e.volume) else {
                continue;
            };
            let Some(home) = self.locality_home(v) else {
                continue;
            };
            // Only single-copy records (a lowered volume's older records,
            // shared with snapshots, may keep more).
            if e.replication != 1
                || e.holds(home)
                || !e.learners.is_empty()
                || e.pending
                || e.replicas.is_empty()
                || busy.contains(&e.key())
                || self.move_cooldown.get(&home).is_some_and(|u| *u > now)
            {
                continue;
            }
            let Some(c) = self.chunks.get(&home) else {
                continue;
            };
            // The fill bound was checked by `locality_home` (a thin extent
            // takes only what is written; the next heartbeat's used bytes
            // count it); a thick one must fit its reservation.
            let extra = taking.get(&home).copied().unwrap_or(0) + EXTENT_SIZE;
            if !v.thin
                && reserved
                    .get_or_insert_with(|| self.reserved_map())
                    .get(&home)
                    .copied()
                    .unwrap_or(0)
                    + extra
                    > c.capacity_bytes
            {
                continue;
            }
            let count = |c: &u64| load.get(c).copied().unwrap_or(0);
            let Some(from) = e.replicas.iter().copied().max_by_key(|c| (count(c), *c)) else {
                continue;
            };
            if !v.thin {
                *taking.entry(home).or_insert(0) += EXTENT_SIZE;
            }
            busy.insert(e.key());
            info!(volume = %e.volume, extent = e.index, from, to = home, "locality move queued");
            self.queue_move(e, home, from, cluster, load, ops);
            queued += 1;
        }
        queued
    }

    /// Ops of one move of `e`'s replica on `from` to `to`: `to` becomes a
    /// learner (epoch + 1) and a task copies to it, replacing `from` when it
    /// completes. Updates `load` and the cluster's counters.
    pub(super) fn queue_move(
        &self,
        e: &ExtentRecord,
        to: u64,
        from: u64,
        cluster: &mut super::ClusterRecord,
        load: &mut HashMap<u64, u64>,
        ops: &mut Vec<Op>,
    ) {
        let mut e = e.clone();
        e.learners.push(to);
        e.epoch += 1;
        let task = RecoveryTask {
            id: cluster.next_task_id,
            volume: e.volume,
            index: e.index,
            target_chunk: to,
            sources: e.replicas.clone(),
            replaces: Some(from),
            epoch: e.epoch,
            generation: e.generation,
        };
        cluster.next_task_id += 1;
        cluster.rebalance_moves += 1;
        *load.entry(to).or_insert(0) += 1;
        if let Some(n) = load.get_mut(&from) {
            *n = n.saturating_sub(1);
        }
        ops.push(Op::Extent(e));
        ops.push(Op::Task(task));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(pairs: &[(u64, u64)]) -> HashMap<u64, u64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_home_takes_ninety_percent_and_stays_above_half() {
        assert_eq!(next_home(None, &w(&[(1, 90), (2, 10)])), Some(1));
        assert_eq!(next_home(None, &w(&[(1, 89), (2, 11)])), None);
        // Hysteresis: the home keeps a window it mostly served.
        assert_eq!(next_home(Some(1), &w(&[(1, 89), (2, 11)])), Some(1));
        assert_eq!(next_home(Some(1), &w(&[(1, 51), (2, 49)])), Some(1));
        assert_eq!(next_home(Some(1), &w(&[(1, 50), (2, 50)])), None);
        // Another chunk with 90% takes over at once.
        assert_eq!(next_home(Some(1), &w(&[(1, 5), (2, 95)])), Some(2));
        // A home that served nothing of a window split elsewhere is gone.
        assert_eq!(next_home(Some(1), &w(&[(2, 60), (3, 40)])), None);
        // An empty window changes nothing.
        assert_eq!(next_home(Some(3), &w(&[])), Some(3));
    }
}
