//! State transitions driven by chunks on the data path: a replica that
//! failed an I/O is reported and dropped from its extent's set, and a chunk
//! lists the extents meta places on it (to delete stale local copies).

use tracing::{info, warn};

use super::{parse_store_key, ChunkState, ExtentRecord, Op, State, VolumeKey, VolumeRecord};
use crate::error::{MetaError, Result};

impl State {
    /// An access point reports that `chunk` failed an I/O on extent `index`
    /// named by its store key `key` (the volume id for generation 0,
    /// `<volume id>.g<generation>` otherwise) while the set was at
    /// `seen_epoch`. A learner is handed to [`State::remove_learner`]. If the
    /// extent is still at that epoch and `chunk` is a member, the member is
    /// removed, the epoch bumped and recovery queued; otherwise nothing
    /// changes. Returns the owning volume and the extent as it is afterwards.
    pub fn report_replica_failure(
        &mut self,
        key: &str,
        index: u64,
        chunk: u64,
        seen_epoch: u64,
        error: &str,
    ) -> Result<(VolumeRecord, ExtentRecord)> {
        let (vid, generation) = parse_store_key(key)?;
        let v = self.get_volume(VolumeKey::Id(&vid.to_string()))?;
        let e = self
            .extents
            .get(&(v.id, index, generation))
            .cloned()
            .ok_or_else(|| MetaError::NotFound(format!("extent {index} of volume {}", v.id)))?;
        if e.learners.contains(&chunk) {
            let now = self.remove_learner(key, index, chunk, seen_epoch, error)?;
            return Ok((v, now));
        }
        if e.epoch != seen_epoch || !e.replicas.contains(&chunk) {
            info!(volume = %v.id, extent = index, chunk, seen_epoch, epoch = e.epoch,
                  "replica failure report for an older set; nothing changed");
            return Ok((v, e));
        }
        if e.replicas.len() == 1 {
            // The last member holds every acknowledged write: the I/O fails
            // instead, and the member stays (unavailable, not lost).
            warn!(volume = %v.id, extent = index, chunk, epoch = e.epoch, error,
                  "the last member failed an I/O; it stays in the set");
            return Ok((v, e));
        }
        let mut e2 = e.clone();
        e2.replicas.retain(|c| *c != chunk);
        e2.epoch += 1;
        self.commit(vec![Op::Extent(e2.clone())])?;
        warn!(volume = %v.id, extent = index, chunk, epoch = e2.epoch, error,
              "replica failed an I/O; removed from the set");
        // Not straight back in as a learner: it just failed.
        self.reconcile_avoiding(&[chunk])?;
        let now = self
            .extents
            .get(&(v.id, index, generation))
            .cloned()
            .unwrap_or(e2);
        Ok((v, now))
    }

    /// Every extent `chunk` holds (as a member or a learner being filled),
    /// with the replication factor it is kept at, in (volume, index) order. Unknown chunk:
    /// NOT_FOUND. A removed chunk holds nothing; a dead one holds what it
    /// is still a member of (extents whose every member died at once), so
    /// its garbage collection never deletes the last copies.
    pub fn chunk_extents(&self, chunk: u64) -> Result<Vec<(ExtentRecord, u32)>> {
        let c = self.chunk(chunk)?;
        if c.state == ChunkState::Removed {
            return Ok(Vec::new());
        }
        Ok(self
            .extents
            .values()
            .filter(|e| e.holds(chunk))
            .map(|e| (e.clone(), e.replication))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::super::{ChunkRegistration, Options};
    use super::*;

    const GIB: u64 = 1 << 30;

    fn open(dir: &Path, now: Instant) -> State {
        let o = Options {
            liveness_timeout: Duration::from_secs(3),
            seed: Some(9),
            sync: false,
            ..Options::default()
        };
        State::open(dir, o, now).unwrap()
    }

    fn reg(st: &mut State, n: u16, now: Instant) -> u64 {
        st.register_chunk(
            &ChunkRegistration {
                portal: format!("127.0.0.{n}:3260"),
                data_addr: format!("127.0.0.{n}:7100"),
                capacity_bytes: 100 * GIB,
                ..Default::default()
            },
            now,
            1,
        )
        .unwrap()
        .id
    }

    #[test]
    fn failure_report_removes_the_member_once_and_queues_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let now = Instant::now();
        let mut st = open(dir.path(), now);
        for n in 1..=3 {
            reg(&mut st, n, now);
        }
        let v = st.create_volume("v", GIB, 2, false, 1).unwrap();
        let id = v.id.to_string();
        let (_, es) = st.extents(&id).unwrap();
        let e0 = es[0].clone();
        let victim = e0.replicas[0];
        let rev = st.revision();

        let (_, e) = st
            .report_replica_failure(&id, 0, victim, e0.epoch, "io error")
            .unwrap();
        // + 1 for the removal, + 1 more when a spare becomes a learner.
        assert!(e.epoch > e0.epoch, "{e:?}");
        assert!(!e.replicas.contains(&victim));
        assert_eq!(e.replicas.len(), 1);
        assert!(st.revision() > rev);
        // A spare (the third chunk) gets a recovery task for the extent.
        let tasks = st.recovery_tasks(None);
        assert!(
            tasks.iter().any(|t| t.volume == v.id && t.index == 0),
            "{tasks:?}"
        );

        // The same report again (old epoch): nothing changes.
        let rev = st.revision();
        let (_, again) = st
            .report_replica_failure(&id, 0, victim, e0.epoch, "io error")
            .unwrap();
        assert_eq!(again, e);
        assert_eq!(st.revision(), rev);
        // A non-member at the current epoch: nothing changes either.
        let (_, same) = st
            .report_replica_failure(&id, 0, victim, e.epoch, "io error")
            .unwrap();
        assert_eq!(same, e);
        assert_eq!(st.revision(), rev);
    }

    #[test]
    fn failure_report_errors() {
        let dir = tempfile::tempdir().unwrap();
        let now = Instant::now();
        let mut st = open(dir.path(), now);
        reg(&mut st, 1, now);
        let v = st.create_volume("v", 4096, 1, false, 1).unwrap();
        let id = v.id.to_string();
        let unknown = "00000000-0000-4000-8000-000000000000";
        let e = st.report_replica_failure(unknown, 0, 1, 1, "").unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = st.report_replica_failure(&id, 7, 1, 1, "").unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = st.report_replica_failure("junk", 0, 1, 1, "").unwrap_err();
        assert_ne!(e.code(), tonic::Code::Ok);
    }

    #[test]
    fn chunk_extents_lists_exactly_the_chunks_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let now = Instant::now();
        let mut st = open(dir.path(), now);
        let a = reg(&mut st, 1, now);
        let b = reg(&mut st, 2, now);
        let v1 = st
            .create_volume("one", 3 * (64 << 20), 1, false, 1)
            .unwrap();
        let v2 = st.create_volume("two", 64 << 20, 2, false, 1).unwrap();
        let mut total = 0;
        for c in [a, b] {
            let list = st.chunk_extents(c).unwrap();
            assert!(list.iter().all(|(e, _)| e.replicas.contains(&c)));
            total += list.len();
            let rf2 = list.iter().filter(|(e, _)| e.volume == v2.id).count();
            assert_eq!(rf2, 1, "the RF=2 extent is on both chunks");
            assert!(list
                .iter()
                .all(|(e, rf)| *rf == if e.volume == v1.id { 1 } else { 2 }));
        }
        assert_eq!(total, 3 + 2);
        assert_eq!(
            st.chunk_extents(99).unwrap_err().code(),
            tonic::Code::NotFound
        );
        // Dead: it keeps only the extents it is the last member of (its
        // RF=1 ones); the RF=2 extent lives on `b`.
        let a_only = st
            .chunk_extents(a)
            .unwrap()
            .iter()
            .filter(|(e, _)| e.volume == v1.id)
            .count();
        let cid = st.cluster_id().to_string();
        st.heartbeat(&cid, b, 0, now + Duration::from_secs(9))
            .unwrap();
        st.check_liveness(now + Duration::from_secs(10)).unwrap();
        let left = st.chunk_extents(a).unwrap();
        assert_eq!(left.len(), a_only);
        assert!(left.iter().all(|(e, _)| e.volume == v1.id));
    }
}
