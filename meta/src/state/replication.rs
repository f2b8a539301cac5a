//! Changing a volume's replication factor online ([`State::set_replicas`])
//! and dropping surplus members ([`State::surplus_members`], used by
//! [`State::reconcile`]). Raising reuses recovery: the records become short
//! of members and reconcile queues copies to learners; lowering trims
//! members in reconcile once no recovery task is in flight for the record.

use std::collections::{BTreeSet, HashMap};

use tracing::info;

use super::{
    extent_count, validate_replicas, ChunkRecord, ChunkState, ExtentKey, ExtentRecord, Op,
    RecoveryTask, State, VolumeKey, VolumeRecord, EXTENT_SIZE,
};
use crate::error::{MetaError, Result};

impl State {
    /// Changes a volume's replication factor (1..=3) online and returns the
    /// volume afterwards. The same factor changes nothing (it only
    /// reconciles, so a retry finishes what an interrupted call started).
    /// NOT_FOUND for an unknown volume, INVALID_ARGUMENT for a factor
    /// outside 1..=3; a raise is FAILED_PRECONDITION with fewer alive chunks
    /// than the new factor and RESOURCE_EXHAUSTED when a thick volume's
    /// extra replicas do not fit.
    ///
    /// The factor lives on each extent record ([`ExtentRecord::replication`])
    /// and the records take the new one as follows. Snapshots share records
    /// across generations (`state/cow.rs`): a snapshot reads the newest
    /// committed record at or below its generation, and so does the live
    /// volume for every index it has not written since.
    /// - A raise applies to every record the live volume reads or writes:
    ///   those of its current generation (pending copy-up destinations
    ///   included) and older ones it still shares with its snapshots (which
    ///   so gain replicas too; a shared record keeps a higher factor it
    ///   already has). Every byte the volume reads meets the new factor.
    /// - A lower applies to the records of the current generation only: no
    ///   snapshot reads them. A record a snapshot shares keeps its factor,
    ///   so a snapshot is never left with fewer replicas than it was taken
    ///   with.
    /// - Records only snapshots read keep the factor they were created with.
    ///   A clone's records are its own; what it still reads through its
    ///   parent snapshot stays at the parent's records' factor (as at
    ///   creation).
    ///
    /// Then the existing machinery does the work, in [`State::reconcile`]:
    /// a raised record is short of members, so a recovery task copies it to
    /// a spare that is a learner until the copy completes (it counts as
    /// degraded until then, as after a chunk loss). A lowered record first
    /// loses the recovery tasks that no longer serve a purpose (a
    /// re-replication it no longer needs, or any task while it has more
    /// members than the new factor): each task is deleted and its learner
    /// dropped, epoch + 1, counted as neither completed nor failed. Then
    /// reconcile drops the surplus members (draining, then the most loaded
    /// chunks first; see [`State::surplus_members`]) with one more epoch
    /// bump, so a replica at the new epoch refuses an access point still
    /// writing with the old set. A record with a task still in flight (a
    /// needed copy) is trimmed when that task ends.
    pub fn set_replicas(&mut self, key: VolumeKey<'_>, replicas: u32) -> Result<VolumeRecord> {
        validate_replicas(replicas)?;
        let v = self.get_volume(key)?;
        if replicas == v.replicas {
            self.reconcile()?;
            return Ok(self.volumes.get(&v.id).cloned().unwrap_or(v));
        }
        let raise = replicas > v.replicas;
        if raise {
            let alive = self
                .chunks
                .values()
                .filter(|c| c.state == ChunkState::Alive)
                .count();
            if alive < replicas as usize {
                return Err(MetaError::FailedPrecondition(format!(
                    "replication factor {replicas} needs {replicas} alive chunks, the cluster has {alive}"
                )));
            }
        }
        // The records the new factor applies to.
        let mut keys: BTreeSet<ExtentKey> = self
            .extents
            .range((v.id, 0, 0)..=(v.id, u64::MAX, u64::MAX))
            .filter(|(k, _)| k.2 == v.generation)
            .map(|(k, _)| *k)
            .collect();
        if raise {
            for index in 0..extent_count(v.size_bytes) {
                if let Some(e) = self.newest_committed(v.id, index, v.generation) {
                    keys.insert(e.key());
                }
            }
        }
        let mut records: Vec<ExtentRecord> = Vec::new();
        for k in &keys {
            let Some(e) = self.extents.get(k) else {
                continue;
            };
            let factor = if raise && k.2 < v.generation {
                e.replication.max(replicas)
            } else {
                replicas
            };
            if factor != e.replication {
                let mut e = e.clone();
                e.replication = factor;
                records.push(e);
            }
        }
        if raise && !v.thin {
            self.check_room_for_raise(&records)?;
        }
        let mut ops = Vec::new();
        let mut cancelled = 0;
        for mut e in records {
            if !raise {
                let members = e.replicas.len();
                let want = e.replication as usize;
                let obsolete: Vec<RecoveryTask> = self
                    .tasks
                    .values()
                    .filter(|t| (t.volume, t.index, t.generation) == e.key())
                    .filter(|t| members > want || (t.replaces.is_none() && members >= want))
                    .cloned()
                    .collect();
                if !obsolete.is_empty() {
                    for t in &obsolete {
                        ops.push(Op::DelTask(t.id));
                        e.learners.retain(|c| *c != t.target_chunk);
                        info!(task = t.id, volume = %e.volume, extent = e.index,
                              chunk = t.target_chunk, "recovery task cancelled: the replication factor was lowered");
                    }
                    e.epoch += 1;
                    cancelled += obsolete.len();
                }
            }
            ops.push(Op::Extent(e));
        }
        let changed = ops.iter().filter(|o| matches!(o, Op::Extent(_))).count();
        let v2 = VolumeRecord {
            replicas,
            ..v.clone()
        };
        ops.push(Op::Volume(v2.clone()));
        self.commit(ops)?;
        info!(volume = %v.id, name = %v.name, from = v.replicas, to = replicas,
              records = changed, cancelled, "replication factor changed");
        // Queue copies for a raise, drop surplus members for a lower.
        self.reconcile()?;
        Ok(self.volumes.get(&v.id).cloned().unwrap_or(v2))
    }

    /// A raise of a thick volume must fit: each record in `records` needs
    /// its missing replicas on distinct alive chunks that do not hold it and
    /// have [`EXTENT_SIZE`] of unreserved capacity (greedy, least reserved
    /// first, as placement does). Recovery then picks its spares by load as
    /// always; this is the admission check.
    fn check_room_for_raise(&self, records: &[ExtentRecord]) -> Result<()> {
        let mut reserved = self.reserved_map();
        let alive: Vec<&ChunkRecord> = self
            .chunks
            .values()
            .filter(|c| c.state == ChunkState::Alive)
            .collect();
        for e in records {
            let need = (e.replication as usize).saturating_sub(e.replicas.len() + e.learners.len());
            if need == 0 {
                continue;
            }
            let mut cands: Vec<(u64, u64)> = alive
                .iter()
                .filter(|c| !e.holds(c.id))
                .map(|c| (reserved.get(&c.id).copied().unwrap_or(0), c.id))
                .filter(|(r, id)| {
                    self.chunks
                        .get(id)
                        .is_some_and(|c| r + EXTENT_SIZE <= c.capacity_bytes)
                })
                .collect();
            if cands.len() < need {
                return Err(MetaError::ResourceExhausted(format!(
                    "not enough free capacity for {} more replicas of extent {} of a thick volume",
                    need, e.index
                )));
            }
            cands.sort_unstable();
            for (_, id) in &cands[..need] {
                *reserved.entry(*id).or_insert(0) += EXTENT_SIZE;
            }
        }
        Ok(())
    }

    /// The `members.len() - keep` members of `e` to drop when it has more
    /// than its replication factor: draining chunks first, then the most
    /// loaded, then the highest id. Every member holds every acknowledged
    /// write (a member that misses one is removed before the ack), so any
    /// `keep >= 1` of them hold the data; learners are not members and are
    /// never counted here.
    pub(super) fn surplus_members(
        &self,
        e: &ExtentRecord,
        keep: usize,
        load: &HashMap<u64, u64>,
    ) -> Vec<u64> {
        let mut order: Vec<u64> = e.replicas.clone();
        order.sort_by_key(|c| {
            let draining = self
                .chunks
                .get(c)
                .is_some_and(|r| r.state == ChunkState::Draining);
            (
                std::cmp::Reverse(draining),
                std::cmp::Reverse(load.get(c).copied().unwrap_or(0)),
                std::cmp::Reverse(*c),
            )
        });
        order.truncate(e.replicas.len().saturating_sub(keep.max(1)));
        order
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::super::tests::{reg_with, with_chunks};
    use super::super::{ExtentRecordV1, Health, Options, T_EXTENTS};
    use super::*;

    const GIB: u64 = 1 << 30;
    const T0: u64 = 1_800_000_000_000;

    fn open(dir: &Path, now: Instant) -> State {
        let o = Options {
            liveness_timeout: Duration::from_secs(3),
            seed: Some(11),
            sync: false,
            ..Options::default()
        };
        State::open(dir, o, now).expect("open state")
    }

    fn records(st: &State, v: &VolumeRecord) -> Vec<ExtentRecord> {
        st.extents(&v.id.to_string()).unwrap().1
    }

    fn record(st: &State, v: &VolumeRecord, index: u64, generation: u64) -> ExtentRecord {
        st.extents
            .get(&(v.id, index, generation))
            .cloned()
            .unwrap_or_else(|| panic!("no record {index}/g{generation}"))
    }

    fn name(n: &str) -> VolumeKey<'_> {
        VolumeKey::Name(n)
    }

    /// Heartbeats from every chunk but `silent`, then the liveness pass
    /// declares `silent` dead.
    fn kill(st: &mut State, ids: &[u64], silent: u64, t0: Instant) {
        let cid = st.cluster_id().to_string();
        for c in ids.iter().filter(|c| **c != silent) {
            st.heartbeat(&cid, *c, 0, t0 + Duration::from_secs(2))
                .unwrap();
        }
        assert_eq!(
            st.check_liveness(t0 + Duration::from_secs(4)).unwrap(),
            vec![silent]
        );
    }

    #[test]
    fn a_raise_is_recovered_by_learners_and_then_meets_the_factor() {
        let (dir, mut st, now, _ids) = with_chunks(3);
        let v = st
            .create_volume("v", 2 * EXTENT_SIZE, 1, false, T0)
            .unwrap();
        let before = records(&st, &v);
        assert!(before.iter().all(|e| e.replication == 1));
        assert_eq!(st.status().health, Health::Ok);

        let v2 = st.set_replicas(name("v"), 2).unwrap();
        assert_eq!(v2.replicas, 2);
        assert_eq!(st.get_volume(name("v")).unwrap().replicas, 2);
        // Every extent is short now: one recovery task each, its target a
        // learner (epoch + 1), the members untouched; degraded until done.
        let tasks = st.recovery_tasks(None);
        assert_eq!(tasks.len(), 2, "{tasks:?}");
        for (e0, e) in before.iter().zip(records(&st, &v)) {
            assert_eq!(e.replication, 2);
            assert_eq!(e.replicas, e0.replicas);
            assert_eq!(e.epoch, e0.epoch + 1);
            assert_eq!(e.learners.len(), 1);
            assert!(!e0.replicas.contains(&e.learners[0]));
            let t = tasks.iter().find(|t| t.index == e.index).unwrap();
            assert_eq!(
                (t.target_chunk, t.sources.clone(), t.replaces, t.epoch),
                (e.learners[0], e0.replicas.clone(), None, e.epoch)
            );
        }
        let s = st.status();
        assert_eq!(
            (s.health, s.degraded_extents, s.recovery_queued),
            (Health::Degraded, 2, 2)
        );
        // The list a learner's chunk gets names the new factor.
        let t = &tasks[0];
        assert!(st
            .chunk_extents(t.target_chunk)
            .unwrap()
            .iter()
            .any(|(e, rf)| e.index == t.index && *rf == 2));

        for t in &tasks {
            let e = st.complete_recovery(t.id, true, "").unwrap().unwrap();
            assert_eq!(e.replicas.len(), 2);
            assert!(e.replicas.contains(&t.target_chunk));
            assert!(e.learners.is_empty());
        }
        let s = st.status();
        assert_eq!(
            (
                s.health,
                s.degraded_extents,
                s.recovery_queued,
                s.recovery_completed
            ),
            (Health::Ok, 0, 0, 2)
        );
        // Nothing more to do: no further tasks, no rebalancing storm.
        assert!(st.recovery_tasks(None).is_empty());

        // Persisted: the volume and every record keep the factor.
        let after = records(&st, &v);
        drop(st);
        let st = open(dir.path(), now);
        assert_eq!(st.get_volume(name("v")).unwrap().replicas, 2);
        assert_eq!(records(&st, &v), after);
        assert!(after.iter().all(|e| e.replication == 2));
    }

    #[test]
    fn the_same_factor_is_a_no_op_and_errors_change_nothing() {
        let (_dir, mut st, _now, _ids) = with_chunks(2);
        let v = st.create_volume("v", EXTENT_SIZE, 1, false, T0).unwrap();
        let rev = st.revision();
        assert_eq!(st.set_replicas(name("v"), 1).unwrap(), v);
        assert_eq!(st.revision(), rev, "unchanged factor: nothing committed");

        let code = |r: Result<VolumeRecord>| r.unwrap_err().code();
        assert_eq!(
            code(st.set_replicas(name("nope"), 2)),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(st.set_replicas(VolumeKey::Id("00000000-0000-4000-8000-000000000000"), 2)),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(st.set_replicas(VolumeKey::Id("not-a-uuid"), 2)),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(st.set_replicas(name("v"), 0)),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(st.set_replicas(name("v"), 4)),
            tonic::Code::InvalidArgument
        );
        // Two alive chunks cannot hold three replicas.
        assert_eq!(
            code(st.set_replicas(name("v"), 3)),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(st.revision(), rev, "a refused call commits nothing");
        assert_eq!(st.get_volume(name("v")).unwrap().replicas, 1);
        assert!(records(&st, &v).iter().all(|e| e.replication == 1));
        assert!(st.recovery_tasks(None).is_empty());
        // Raising to the same factor twice: the second call is a no-op.
        st.set_replicas(name("v"), 2).unwrap();
        let rev = st.revision();
        let tasks = st.recovery_tasks(None);
        st.set_replicas(name("v"), 2).unwrap();
        assert_eq!(st.revision(), rev);
        assert_eq!(st.recovery_tasks(None), tasks);
    }

    #[test]
    fn a_thick_raise_needs_room_for_the_extra_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let now = Instant::now();
        let mut st = open(dir.path(), now);
        // Room for two extents per chunk.
        for n in 1..=2 {
            reg_with(&mut st, n, 2 * EXTENT_SIZE, now);
        }
        st.create_volume("thick", 2 * EXTENT_SIZE, 1, false, T0)
            .unwrap();
        st.create_volume("other", EXTENT_SIZE, 1, false, T0)
            .unwrap();
        // 3 of 4 slots are taken: one more replica fits, two do not.
        let rev = st.revision();
        assert_eq!(
            st.set_replicas(name("thick"), 2).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(st.revision(), rev);
        st.set_replicas(name("other"), 2).unwrap();
        // A thin volume reserves nothing: no such check.
        st.create_volume("thin", 2 * EXTENT_SIZE, 1, true, T0)
            .unwrap();
        st.set_replicas(name("thin"), 2).unwrap();
    }

    #[test]
    fn a_lower_drops_surplus_members_with_an_epoch_bump() {
        let (_dir, mut st, now, ids) = with_chunks(3);
        let v = st.create_volume("v", EXTENT_SIZE, 3, false, T0).unwrap();
        let e0 = record(&st, &v, 0, 0);
        assert_eq!(e0.replicas.len(), 3);
        let rev = st.revision();

        let v1 = st.set_replicas(name("v"), 1).unwrap();
        assert_eq!(v1.replicas, 1);
        assert!(st.revision() > rev);
        let e = record(&st, &v, 0, 0);
        assert_eq!(e.replication, 1);
        assert_eq!(e.replicas.len(), 1);
        assert!(e0.replicas.contains(&e.replicas[0]));
        assert!(e.learners.is_empty());
        assert!(e.epoch > e0.epoch, "the old set is fenced: {e:?}");
        assert!(st.recovery_tasks(None).is_empty());
        let s = st.status();
        assert_eq!((s.health, s.degraded_extents), (Health::Ok, 0));
        // The dropped chunks hold nothing any more (their GC may delete
        // their copies); the kept one still does.
        for c in &ids {
            let held = st.chunk_extents(*c).unwrap().len();
            let want = usize::from(e.replicas.contains(c));
            assert_eq!(held, want, "chunk {c}");
            assert_eq!(st.get_chunk(*c, now).unwrap().extents, want as u64);
        }
        // No rebalancing moves the remaining replica around for nothing.
        assert!(st.recovery_tasks(None).is_empty());
    }

    #[test]
    fn a_lower_cancels_recovery_it_makes_pointless_and_keeps_what_is_still_needed() {
        // RF 2, a member dies: the survivor plus a learner being filled.
        let (_dir, mut st, t0, ids) = with_chunks(3);
        let v = st.create_volume("v", EXTENT_SIZE, 2, false, T0).unwrap();
        let e0 = record(&st, &v, 0, 0);
        kill(&mut st, &ids, e0.replicas[0], t0);
        let mid = record(&st, &v, 0, 0);
        let t = st.recovery_tasks(None)[0].clone();
        assert_eq!(mid.learners, vec![t.target_chunk]);
        let failed = st.status().recovery_failed;

        // Lowered to 1, the copy is pointless: cancelled, learner dropped,
        // epoch + 1, not counted as a failure.
        st.set_replicas(name("v"), 1).unwrap();
        let e = record(&st, &v, 0, 0);
        assert_eq!(e.replicas, vec![e0.replicas[1]]);
        assert!(e.learners.is_empty(), "{e:?}");
        assert!(e.epoch > mid.epoch);
        assert!(st.recovery_tasks(None).is_empty());
        let s = st.status();
        assert_eq!((s.health, s.recovery_failed), (Health::Ok, failed));
        assert_eq!(
            st.complete_recovery(t.id, true, "").unwrap_err().code(),
            tonic::Code::NotFound,
            "a late report of the cancelled copy changes nothing"
        );
        assert_eq!(record(&st, &v, 0, 0), e);

        // RF 3 on four chunks, two members die: one member and one learner.
        let (_dir, mut st, t0, ids) = with_chunks(4);
        let v = st.create_volume("w", EXTENT_SIZE, 3, false, T0).unwrap();
        let e0 = record(&st, &v, 0, 0);
        let cid = st.cluster_id().to_string();
        let survivor = e0.replicas[2];
        for c in ids.iter().filter(|c| !e0.replicas[..2].contains(c)) {
            st.heartbeat(&cid, *c, 0, t0 + Duration::from_secs(2))
                .unwrap();
        }
        st.check_liveness(t0 + Duration::from_secs(4)).unwrap();
        let mid = record(&st, &v, 0, 0);
        assert_eq!(mid.replicas, vec![survivor]);
        let t = st.recovery_tasks(None)[0].clone();
        // Lowered to 2 the copy is still needed: kept, and it completes.
        st.set_replicas(name("w"), 2).unwrap();
        assert_eq!(st.recovery_tasks(None), vec![t.clone()]);
        let e = record(&st, &v, 0, 0);
        assert_eq!(
            (e.replicas.clone(), e.learners.clone()),
            (mid.replicas, mid.learners)
        );
        assert_eq!(e.epoch, mid.epoch, "only the factor changed");
        let done = st.complete_recovery(t.id, true, "").unwrap().unwrap();
        assert_eq!(done.replicas.len(), 2);
        assert_eq!(st.status().health, Health::Ok);
    }

    #[test]
    fn a_lower_during_a_drain_move_drops_the_draining_member() {
        let (_dir, mut st, _now, _ids) = with_chunks(3);
        let v = st.create_volume("v", EXTENT_SIZE, 2, false, T0).unwrap();
        let e0 = record(&st, &v, 0, 0);
        let (draining, other) = (e0.replicas[0], e0.replicas[1]);
        st.drain_chunk(draining).unwrap();
        let t = st.recovery_tasks(None)[0].clone();
        assert_eq!(t.replaces, Some(draining));
        // Two members for a factor of one: the move is cancelled and the
        // draining chunk is the member that goes.
        st.set_replicas(name("v"), 1).unwrap();
        let e = record(&st, &v, 0, 0);
        assert_eq!(e.replicas, vec![other]);
        assert!(e.learners.is_empty());
        assert!(st.recovery_tasks(None).is_empty());
        st.remove_chunk(draining)
            .expect("the drained chunk holds nothing now");
    }

    #[test]
    fn snapshot_records_keep_their_factor_and_shared_ones_are_raised_only() {
        let (_dir, mut st, _now, _ids) = with_chunks(3);
        let v = st
            .create_volume("v", 2 * EXTENT_SIZE, 1, false, T0)
            .unwrap();
        let vid = v.id.to_string();
        st.create_snapshot(&vid, "s", T0).unwrap();
        // Extent 0 is written after the snapshot (copied up to generation
        // 1); extent 1 is still shared by the snapshot and the volume.
        let (_, dst) = st.copy_up_extent(&vid, 0).unwrap();
        st.commit_copy_up(&vid, 0, &dst.store_key()).unwrap();
        assert_eq!(record(&st, &v, 0, 1).replication, 1);

        st.set_replicas(name("v"), 2).unwrap();
        // The volume reads (v,0,g1) and (v,1,g0): both raised; (v,0,g0) is
        // only the snapshot's and keeps its factor.
        assert_eq!(record(&st, &v, 0, 1).replication, 2);
        assert_eq!(record(&st, &v, 1, 0).replication, 2);
        assert_eq!(record(&st, &v, 0, 0).replication, 1);
        let mut keys: Vec<(u64, u64)> = st
            .recovery_tasks(None)
            .iter()
            .map(|t| (t.index, t.generation))
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, vec![(0, 1), (1, 0)]);
        for t in st.recovery_tasks(None) {
            st.complete_recovery(t.id, true, "").unwrap();
        }
        assert_eq!(st.status().health, Health::Ok);

        // Lowered again: only the current generation's record drops a
        // member; the shared one keeps two replicas (the snapshot reads it).
        st.set_replicas(name("v"), 1).unwrap();
        let own = record(&st, &v, 0, 1);
        assert_eq!((own.replication, own.replicas.len()), (1, 1));
        let shared = record(&st, &v, 1, 0);
        assert_eq!((shared.replication, shared.replicas.len()), (2, 2));
        assert_eq!(record(&st, &v, 0, 0).replicas.len(), 1);
        assert_eq!(st.status().health, Health::Ok);

        // A clone's factor covers its own records only: what it still reads
        // through the snapshot stays at the parent records' factor.
        let snap = st.list_snapshots(Some(&vid)).unwrap()[0].clone();
        let c = st
            .clone_volume(&snap.id.to_string(), "c", 0, 1, true, T0)
            .unwrap();
        let parent_before: Vec<ExtentRecord> = records(&st, &v);
        st.set_replicas(name("c"), 3).unwrap();
        assert!(records(&st, &c).is_empty());
        assert_eq!(records(&st, &v), parent_before);
        assert!(st.recovery_tasks(None).is_empty());
        // Its first write places a record at its own factor.
        let placed = st.copy_up_extent(&c.id.to_string(), 0).unwrap().1;
        assert_eq!(placed.replication, 3);
    }

    #[test]
    fn records_of_an_older_store_load_with_their_volumes_factor() {
        let dir = tempfile::tempdir().unwrap();
        let now = Instant::now();
        let mut st = open(dir.path(), now);
        for n in 1..=3 {
            reg_with(&mut st, n, 100 * GIB, now);
        }
        let v = st.create_volume("v", EXTENT_SIZE, 2, false, T0).unwrap();
        let e = record(&st, &v, 0, 0);
        // Rewrite the record as a meta without per-record factors stored it.
        let old = ExtentRecordV1 {
            volume: e.volume,
            index: e.index,
            replicas: e.replicas.clone(),
            epoch: e.epoch,
            learners: e.learners.clone(),
            generation: e.generation,
            pending: e.pending,
        };
        let bytes = bincode::serialize(&old).unwrap();
        assert!(bincode::deserialize::<ExtentRecord>(&bytes).is_err());
        st.trees[T_EXTENTS]
            .insert(super::super::extent_key(&e.volume, 0, 0), bytes)
            .unwrap();
        st.flush().unwrap();
        drop(st);

        let mut st = open(dir.path(), now);
        assert_eq!(record(&st, &v, 0, 0), e);
        assert_eq!(st.status().health, Health::Ok);
        // And the new layout is one an older meta still reads (bincode
        // ignores the trailing factor).
        let new = bincode::serialize(&e).unwrap();
        let back: ExtentRecordV1 = bincode::deserialize(&new).unwrap();
        assert_eq!(back, old);
        st.set_replicas(name("v"), 1).unwrap();
        assert_eq!(record(&st, &v, 0, 0).replicas.len(), 1);
    }
}
