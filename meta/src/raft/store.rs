//! The meta group's log and state machine, both in meta's sled database.
//!
//! - Log: tree `raft_log` (index, big-endian → bincode entry) and tree
//!   `raft_meta` (the vote, the last purged log id, the committed log id).
//!   An append returns once sled has flushed it.
//! - State machine: the record trees of [`crate::state`] plus tree
//!   `raft_sm` (the last applied log id, the last membership). A batch and
//!   the log id that applied it are written in one sled transaction, so a
//!   restart replays exactly the entries after it.
//! - Snapshot: every record tree, serialised whole, built on demand and
//!   kept in `raft_sm` (a replacement meta node catches up from it); the
//!   log up to it is purged by openraft's policy, which bounds the disk.
//!
//! The state machine never touches the in-memory model: it pushes what it
//! applied to an [`AppliedQueue`], which [`crate::state::State::catch_up`]
//! drains under the state lock. So openraft never waits on that lock.

// openraft's traits fix the error type (StorageError, about 224 bytes); the
// helpers here return it as they are.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use super::{NodeId, Outcome, TypeConfig};
use crate::state::{
    op_writes, record_tree_names, stored_revision, transact, Applied, AppliedQueue,
};

type Node = openraft::BasicNode;
type SErr = StorageError<NodeId>;

fn io_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

fn w_err(e: AnyError) -> SErr {
    openraft::StorageIOError::write(e).into()
}

fn r_err(e: AnyError) -> SErr {
    openraft::StorageIOError::read(e).into()
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, SErr> {
    bincode::serialize(v).map_err(|e| w_err(io_err(e)))
}

fn dec<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, SErr> {
    bincode::deserialize(b).map_err(|e| r_err(io_err(e)))
}

fn sled_w(e: sled::Error) -> SErr {
    w_err(io_err(e))
}

fn sled_r(e: sled::Error) -> SErr {
    r_err(io_err(e))
}

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";
const COMMITTED: &[u8] = b"committed";
const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
const SNAPSHOT: &[u8] = b"snapshot";

// ------------------------------------------------------------------ log

/// The Raft log in sled.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    /// The log of `db`.
    pub fn open(db: &sled::Db) -> Result<LogStore, sled::Error> {
        Ok(LogStore {
            db: db.clone(),
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
        })
    }

    /// Whether this node never took part in a group (no vote, no log).
    pub fn is_pristine(&self) -> Result<bool, sled::Error> {
        Ok(self.meta.get(VOTE)?.is_none() && self.log.is_empty())
    }

    fn get<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, SErr> {
        match self.meta.get(key).map_err(sled_r)? {
            Some(b) => Ok(Some(dec(&b)?)),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&self, key: &[u8], v: &T) -> Result<(), SErr> {
        self.meta.insert(key, enc(v)?).map_err(sled_w)?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), SErr> {
        self.db.flush_async().await.map_err(sled_w)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.log.range(start.to_be_bytes()..) {
            let (k, v) = kv.map_err(sled_r)?;
            let idx = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| r_err(AnyError::error("a raft log key is not 8 bytes")))?,
            );
            if !range.contains(&idx) {
                break;
            }
            out.push(dec(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let purged: Option<LogId<NodeId>> = self.get(PURGED)?;
        let last = match self.log.last().map_err(sled_r)? {
            Some((_, v)) => Some(dec::<Entry<TypeConfig>>(&v)?.log_id),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put(VOTE, vote)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        self.put(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self.get::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&e.log_id.index.to_be_bytes(), enc(&e)?);
        }
        self.log.apply_batch(batch).map_err(sled_w)?;
        let res = self.db.flush_async().await.map(|_| ());
        callback.log_io_completed(res.map_err(std::io::Error::other));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = kv.map_err(sled_r)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(sled_w)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.put(PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = kv.map_err(sled_r)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(sled_w)?;
        Ok(())
    }
}

// ------------------------------------------------------------------ state machine

/// A whole copy of the record trees.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    /// (tree index, key, value) of every record.
    records: Vec<(u8, Vec<u8>, Vec<u8>)>,
}

/// A snapshot as kept in `raft_sm`.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The state machine: the record trees of `crate::state`, in sled.
#[derive(Clone)]
pub struct StateMachine {
    db: sled::Db,
    /// The record trees in `record_tree_names()` order, then `raft_sm`.
    trees: Vec<sled::Tree>,
    queue: Arc<AppliedQueue>,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    /// The revision the records are at.
    revision: u64,
}

impl StateMachine {
    /// The state machine of `db`; what it applies goes to `queue`.
    pub fn open(db: &sled::Db, queue: Arc<AppliedQueue>) -> Result<StateMachine, SErr> {
        let mut trees = Vec::new();
        for n in record_tree_names() {
            trees.push(db.open_tree(n).map_err(sled_r)?);
        }
        let sm_tree = db.open_tree("raft_sm").map_err(sled_r)?;
        trees.push(sm_tree);
        let mut sm = StateMachine {
            db: db.clone(),
            trees,
            queue,
            applied: None,
            membership: StoredMembership::default(),
            revision: 0,
        };
        sm.applied = sm.get::<Option<LogId<NodeId>>>(APPLIED)?.flatten();
        sm.membership = sm.get(MEMBERSHIP)?.unwrap_or_default();
        sm.revision = stored_revision(&sm.trees[0]).map_err(|e| r_err(io_err(e)))?;
        Ok(sm)
    }

    fn sm(&self) -> &sled::Tree {
        &self.trees[self.trees.len() - 1]
    }

    fn get<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, SErr> {
        match self.sm().get(key).map_err(sled_r)? {
            Some(b) => Ok(Some(dec(&b)?)),
            None => Ok(None),
        }
    }

    fn push(&self, a: Applied) {
        if let Ok(mut q) = self.queue.lock() {
            q.push_back(a);
        }
    }

    /// The `raft_sm` writes recording `applied` (and the membership).
    fn position_writes(&self) -> Result<crate::state::Writes, SErr> {
        let sm = self.trees.len() - 1;
        Ok(vec![
            (sm, APPLIED.to_vec(), Some(enc(&self.applied)?)),
            (sm, MEMBERSHIP.to_vec(), Some(enc(&self.membership)?)),
        ])
    }

    fn write(&self, mut writes: crate::state::Writes) -> Result<(), SErr> {
        writes.extend(self.position_writes()?);
        transact(&self.trees, &writes).map_err(|e| w_err(io_err(e)))
    }

    /// Apply one normal entry: each batch on top of exactly the revision
    /// it was decided at; the first that is not stops the entry (a
    /// conflict: the same on every member, the proposer retries).
    fn apply_proposal(&mut self, batches: Vec<crate::state::Batch>) -> Result<Outcome, SErr> {
        let mut writes = Vec::new();
        let mut applied = Vec::new();
        let mut revision = self.revision;
        let mut conflict = None;
        for b in batches {
            if b.base_revision != revision {
                conflict = Some((b.base_revision, revision));
                break;
            }
            writes.extend(op_writes(&b.ops).map_err(|e| w_err(io_err(e)))?);
            revision = b.revision();
            applied.push(b);
        }
        self.write(writes)?;
        self.revision = revision;
        let n = applied.len();
        for b in applied {
            self.push(Applied::Batch(b));
        }
        Ok(Outcome {
            applied: n,
            revision,
            conflict,
        })
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, SErr> {
        let mut records = Vec::new();
        for (i, t) in self.trees[..self.trees.len() - 1].iter().enumerate() {
            for kv in t.iter() {
                let (k, v) = kv.map_err(sled_r)?;
                records.push((i as u8, k.to_vec(), v.to_vec()));
            }
        }
        let data = enc(&SnapshotData { records })?;
        let snapshot_id = match self.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.revision),
            None => format!("none-{}", self.revision),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.sm().insert(SNAPSHOT, enc(&stored)?).map_err(sled_w)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.build())
            .await
            .map_err(|e| w_err(io_err(e)))?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), SErr> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            self.applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => {
                    self.write(Vec::new())?;
                    out.push(Outcome {
                        applied: 0,
                        revision: self.revision,
                        conflict: None,
                    });
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    self.write(Vec::new())?;
                    out.push(Outcome {
                        applied: 0,
                        revision: self.revision,
                        conflict: None,
                    });
                }
                EntryPayload::Normal(p) => out.push(self.apply_proposal(p.batches)?),
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = dec(&bytes)?;
        let records = self.trees.len() - 1;
        let mut writes: crate::state::Writes = Vec::new();
        for (i, t) in self.trees[..records].iter().enumerate() {
            for kv in t.iter() {
                let (k, _) = kv.map_err(sled_r)?;
                writes.push((i, k.to_vec(), None));
            }
        }
        for (i, k, v) in data.records {
            let i = i as usize;
            if i >= records {
                return Err(r_err(AnyError::error(format!(
                    "snapshot names record tree {i}; this meta has {records}"
                ))));
            }
            writes.push((i, k, Some(v)));
        }
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.write(writes)?;
        self.revision = stored_revision(&self.trees[0]).map_err(|e| r_err(io_err(e)))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        self.sm().insert(SNAPSHOT, enc(&stored)?).map_err(sled_w)?;
        self.db.flush_async().await.map_err(sled_w)?;
        self.push(Applied::Reload);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        Ok(self.get::<StoredSnapshot>(SNAPSHOT)?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// An empty queue of applied changes.
pub fn new_queue() -> Arc<AppliedQueue> {
    Arc::new(std::sync::Mutex::new(VecDeque::new()))
}
