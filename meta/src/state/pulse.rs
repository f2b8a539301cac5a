//! The pulse: what a chunk's heartbeat needs, kept apart from the state
//! lock so a heartbeat never queues behind a mutation (a 16 TiB thick
//! create, a commit waiting on the meta group's log).
//!
//! The state publishes into it whatever is durable (the cluster id, the
//! revision, each chunk's state) and keeps its memory-only liveness here:
//! when each chunk was last heard from, what it applied, how long its lease
//! runs, and the in-force rule that bounds those leases. A heartbeat takes
//! only this lock, briefly, and never across an await. The lock order is
//! the state lock first, then this one.
//!
//! A chunk's death is published the moment it is decided, before it is
//! through the log: a heartbeat from a chunk being declared dead is refused
//! (it re-registers), never answered with a lease. Everything else is
//! published once durable, so a heartbeat never announces a revision that
//! could still be rolled back.
//!
//! The volume I/O counts heartbeats carry (locality) wait in a queue for
//! the state to fold in (`State::fold_io`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::in_force::InForce;
use super::ChunkState;
use crate::error::{MetaError, Result};
use crate::ids::Uuid;

/// What meta knows of a chunk between heartbeats (memory only).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Liveness {
    pub last_seen: Instant,
    pub used_bytes: u64,
    /// Highest metadata revision the chunk reported as applied (the
    /// in-force waits, see `State::in_force_waiting`).
    pub applied_revision: u64,
    /// Until when the chunk may serve, as far as meta knows: the latest
    /// end of a lease granted (from receipt; the chunk counts from its
    /// send time, so its own lease ends no later). See `state/in_force.rs`.
    pub lease_until: Instant,
}

/// Most heartbeats' I/O reports kept for the state to fold in; older ones
/// are dropped (locality is an optimisation, and counters are totals, so a
/// dropped report loses nothing the next one does not carry).
const MAX_QUEUED_IO: usize = 4096;

/// The heartbeat side of the state (see the module doc).
#[derive(Debug)]
pub struct Pulse {
    cluster_id: Uuid,
    revision: u64,
    chunks: HashMap<u64, ChunkState>,
    pub(crate) live: HashMap<u64, Liveness>,
    pub(crate) in_force: InForce,
    liveness_timeout: Duration,
    io: Vec<(u64, Vec<(String, u64)>)>,
}

/// The pulse, shared by the state and the heartbeat handler.
pub type SharedPulse = Arc<Mutex<Pulse>>;

/// Lock the pulse. Every critical section is short and panic-free; a
/// poisoned lock (a panic elsewhere) still holds consistent data.
pub(crate) fn lock(p: &SharedPulse) -> MutexGuard<'_, Pulse> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// `given` (what a chunk sent) names cluster `cluster`.
pub(crate) fn check_cluster_id(cluster: Uuid, given: &str) -> Result<()> {
    let id = Uuid::parse(given).map_err(|_| {
        MetaError::FailedPrecondition(format!(
            "cluster id {given:?} is not this cluster ({cluster})"
        ))
    })?;
    if id != cluster {
        return Err(MetaError::FailedPrecondition(format!(
            "chunk belongs to cluster {id}, this is cluster {cluster}"
        )));
    }
    Ok(())
}

/// A heartbeat's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The chunk's state (alive or draining).
    pub state: ChunkState,
    /// The durable metadata revision.
    pub revision: u64,
    /// How long the chunk may serve from its send time.
    pub lease: Duration,
}

impl Pulse {
    /// An empty pulse for cluster `cluster_id`.
    pub(crate) fn new(cluster_id: Uuid, revision: u64, liveness_timeout: Duration) -> Self {
        Pulse {
            cluster_id,
            revision,
            chunks: HashMap::new(),
            live: HashMap::new(),
            in_force: InForce::new(liveness_timeout),
            liveness_timeout,
            io: Vec::new(),
        }
    }

    /// Publish the durable cluster id, revision and chunk states.
    pub(crate) fn publish(
        &mut self,
        cluster_id: Uuid,
        revision: u64,
        chunks: impl Iterator<Item = (u64, ChunkState)>,
    ) {
        self.cluster_id = cluster_id;
        self.revision = revision;
        self.chunks.clear();
        self.chunks.extend(chunks);
    }

    /// Publish a durable revision the group's log reached and the chunk
    /// states it wrote (see [`super::Announcer`]); never moves back.
    pub(crate) fn advance(
        &mut self,
        cluster_id: Option<Uuid>,
        revision: u64,
        chunks: impl Iterator<Item = (u64, ChunkState)>,
    ) {
        if revision <= self.revision {
            return;
        }
        if let Some(id) = cluster_id {
            self.cluster_id = id;
        }
        self.revision = revision;
        self.chunks.extend(chunks);
    }

    /// Chunk `id` is being declared dead or removed: refuse its heartbeats
    /// from now on, and forget its liveness.
    pub(crate) fn gone(&mut self, id: u64, state: ChunkState) {
        self.chunks.insert(id, state);
        self.live.remove(&id);
    }

    /// Record a heartbeat from `chunk_id` received at `now` (liveness and
    /// used bytes only; see [`Pulse::heartbeat`] for the whole call).
    /// Returns the chunk's state and the revision.
    pub(crate) fn beat(
        &mut self,
        cluster_id: &str,
        chunk_id: u64,
        used_bytes: u64,
        now: Instant,
    ) -> Result<(ChunkState, u64)> {
        check_cluster_id(self.cluster_id, cluster_id)?;
        let state = *self
            .chunks
            .get(&chunk_id)
            .ok_or_else(|| MetaError::NotFound(format!("chunk {chunk_id}")))?;
        match state {
            ChunkState::Alive | ChunkState::Draining => {
                let (applied_revision, lease_until) = self
                    .live
                    .get(&chunk_id)
                    .map(|l| (l.applied_revision, l.lease_until))
                    .unwrap_or((0, now));
                self.live.insert(
                    chunk_id,
                    Liveness {
                        last_seen: now,
                        used_bytes,
                        applied_revision,
                        lease_until,
                    },
                );
                Ok((state, self.revision))
            }
            ChunkState::Dead => Err(MetaError::FailedPrecondition(format!(
                "chunk {chunk_id} was declared dead; it must re-register"
            ))),
            ChunkState::Removed => Err(MetaError::FailedPrecondition(format!(
                "chunk {chunk_id} was removed from the cluster"
            ))),
        }
    }

    /// Records that chunk `chunk_id` has applied every metadata revision up
    /// to `revision`. Only moves forward; unknown chunks are ignored.
    pub(crate) fn note_applied(&mut self, chunk_id: u64, revision: u64) {
        if let Some(l) = self.live.get_mut(&chunk_id) {
            l.applied_revision = l.applied_revision.max(revision);
        }
    }

    /// The lease for chunk `chunk_id`'s heartbeat received at `now`: the
    /// liveness timeout, shorter while it lags behind a revision a call
    /// waits for, zero once it has lagged longer than the bound.
    pub(crate) fn chunk_lease(&mut self, chunk_id: u64, now: Instant) -> Duration {
        let full = self.liveness_timeout;
        let Some(l) = self.live.get_mut(&chunk_id) else {
            return Duration::ZERO;
        };
        let lease = self.in_force.lease(l.applied_revision, full, now);
        l.lease_until = l.lease_until.max(now + lease);
        if lease < full {
            tracing::debug!(
                chunk = chunk_id,
                applied = l.applied_revision,
                ?lease,
                "chunk lags a revision in force; lease shortened"
            );
        }
        lease
    }

    /// A whole heartbeat: record it, note what the chunk applied, grant its
    /// lease, and queue its volume I/O for the state.
    pub fn heartbeat(
        &mut self,
        cluster_id: &str,
        chunk_id: u64,
        used_bytes: u64,
        applied_revision: u64,
        io: Vec<(String, u64)>,
        now: Instant,
    ) -> Result<Beat> {
        let (state, revision) = self.beat(cluster_id, chunk_id, used_bytes, now)?;
        self.note_applied(chunk_id, applied_revision);
        let lease = self.chunk_lease(chunk_id, now);
        if !io.is_empty() {
            if self.io.len() >= MAX_QUEUED_IO {
                self.io.remove(0);
            }
            self.io.push((chunk_id, io));
        }
        Ok(Beat {
            state,
            revision,
            lease,
        })
    }

    /// The queued I/O reports, oldest first.
    pub(crate) fn take_io(&mut self) -> Vec<(u64, Vec<(String, u64)>)> {
        std::mem::take(&mut self.io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pulse() -> (Pulse, String) {
        let id = Uuid::random(&mut rand::thread_rng());
        let mut p = Pulse::new(id, 4, Duration::from_secs(3));
        p.publish(
            id,
            4,
            [(1, ChunkState::Alive), (2, ChunkState::Draining)].into_iter(),
        );
        (p, id.to_string())
    }

    #[test]
    fn a_heartbeat_gets_the_published_revision_and_a_full_lease() {
        let (mut p, id) = pulse();
        let now = Instant::now();
        let b = p.heartbeat(&id, 1, 10, 4, vec![], now).unwrap();
        assert_eq!(
            b,
            Beat {
                state: ChunkState::Alive,
                revision: 4,
                lease: Duration::from_secs(3)
            }
        );
        assert_eq!(
            p.heartbeat(&id, 2, 0, 4, vec![], now).unwrap().state,
            ChunkState::Draining
        );
        assert_eq!(p.live[&1].used_bytes, 10);
    }

    #[test]
    fn a_chunk_declared_dead_is_refused_at_once() {
        let (mut p, id) = pulse();
        let now = Instant::now();
        p.heartbeat(&id, 1, 0, 4, vec![], now).unwrap();
        p.gone(1, ChunkState::Dead);
        let e = p.heartbeat(&id, 1, 0, 4, vec![], now).unwrap_err();
        assert!(e.to_string().contains("re-register"), "{e}");
        assert!(!p.live.contains_key(&1));
        assert!(matches!(
            p.heartbeat(&id, 9, 0, 4, vec![], now),
            Err(MetaError::NotFound(_))
        ));
        assert!(matches!(
            p.heartbeat("not-a-uuid", 2, 0, 4, vec![], now),
            Err(MetaError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn a_lagging_chunk_gets_a_shortened_lease() {
        let (mut p, id) = pulse();
        let t0 = Instant::now();
        p.heartbeat(&id, 1, 0, 3, vec![], t0).unwrap();
        p.in_force.require(4, t0);
        let b = p
            .heartbeat(&id, 1, 0, 3, vec![], t0 + Duration::from_secs(1))
            .unwrap();
        assert_eq!(b.lease, Duration::from_secs(2));
        let b = p
            .heartbeat(&id, 1, 0, 4, vec![], t0 + Duration::from_secs(1))
            .unwrap();
        assert_eq!(b.lease, Duration::from_secs(3));
    }

    #[test]
    fn io_reports_queue_bounded() {
        let (mut p, id) = pulse();
        let now = Instant::now();
        for n in 0..(MAX_QUEUED_IO as u64 + 10) {
            p.heartbeat(&id, 1, 0, 4, vec![("v".into(), n)], now)
                .unwrap();
        }
        let q = p.take_io();
        assert_eq!(q.len(), MAX_QUEUED_IO);
        assert_eq!(q[0].1[0].1, 10);
        assert!(p.take_io().is_empty());
    }
}
