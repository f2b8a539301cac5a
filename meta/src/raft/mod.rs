//! The meta group: meta's state replicated by Raft (openraft).
//!
//! Every change meta commits is a [`crate::state::Batch`] of whole-record
//! writes, decided by the leader (ids, placement, times: all chosen there)
//! and put through the log in decision order; the calls that decide while
//! one entry is in flight share the next (group commit, `commit.rs`, so no
//! lock is held across the quorum's fsyncs). Applying an
//! entry only writes records, so it is deterministic; a batch decided on a
//! revision other than the one it lands on is skipped on every member (a
//! conflict the proposer reports as retryable). See `store.rs` for the
//! sled layout and `network.rs` for the gRPC transport.
//!
//! Only the leader serves the `Meta` API, and only while it knows a quorum
//! acknowledged it within the leader lease (the minimum election timeout,
//! less a margin): a deposed or frozen leader stops answering before any
//! other member can be elected. A new leader first applies everything
//! committed, then gives every chunk and VIP holder a full lease of grace
//! ([`crate::state::State::on_leader_start`]).

pub mod commit;
pub mod network;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};

use crate::state::{Announcer, Batch};

/// A meta node's id in the group.
pub type NodeId = u64;

/// What one log entry asks: batches, in the order they were decided.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Proposal {
    /// Applied in order, each on top of the previous one.
    pub batches: Vec<Batch>,
}

/// What applying an entry did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Batches applied (all of them unless `conflict`).
    pub applied: usize,
    /// The revision the records are at afterwards.
    pub revision: u64,
    /// (decided at, found): the batch that did not apply.
    pub conflict: Option<(u64, u64)>,
}

openraft::declare_raft_types!(
    /// openraft's type configuration for meta.
    pub TypeConfig:
        D = Proposal,
        R = Outcome,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// Timing of the group.
///
/// openraft's election timeout is random in `[election_min,
/// 2 * election_min)`, and a follower that heard from a leader lets its
/// lease (the maximum election timeout) pass first, refusing votes until
/// then. So a dead leader is replaced after between 3 and 4 times
/// `election_min` (0.9-1.2 s by default), well inside a chunk's lease (the
/// liveness timeout, 3 s by default).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Leader heartbeat to followers.
    pub heartbeat: Duration,
    /// The minimum election timeout.
    pub election_min: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(300),
        }
    }
}

impl Timing {
    /// The maximum election timeout, which is also openraft's leader lease
    /// on the followers.
    pub fn election_max(&self) -> Duration {
        self.election_min * 2
    }

    /// How long after a quorum last acknowledged it a leader still serves:
    /// three quarters of the followers' leader lease (no follower votes for
    /// anyone else before that lease has passed since it last heard from
    /// this leader, which is no earlier than the acknowledgement), so it
    /// stops before any other node can lead. Clock rates differ by far
    /// less than the margin.
    pub fn leader_lease(&self) -> Duration {
        self.election_max() * 3 / 4
    }

    /// openraft's configuration.
    pub fn config(&self) -> openraft::Config {
        openraft::Config {
            cluster_name: "ironblock-meta".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max().as_millis() as u64,
            // Compact after this many entries: the snapshot is every record
            // (small), the log is what grows.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5000),
            max_in_snapshot_log_to_keep: 1000,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
    }
}

/// Where this node stands in the group, for the service and status.
#[derive(Clone, Debug, Default)]
pub struct Standing {
    /// The leader as known here: (id, gRPC address).
    pub leader: Option<(NodeId, String)>,
    /// The term this node serves as leader in (after its start-up), if any.
    pub serving_term: Option<u64>,
    /// When a quorum last acknowledged this node as leader.
    pub quorum_ack: Option<Instant>,
}

/// The meta group as the service sees it.
#[derive(Clone)]
pub struct Group {
    /// openraft.
    pub raft: Raft,
    /// This node's id.
    pub id: NodeId,
    /// Timing in force.
    pub timing: Timing,
    /// The leader's path into the log (group commit, see `commit.rs`).
    pub committer: commit::Committer,
    standing: Arc<Mutex<Standing>>,
}

/// Why this node does not serve a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotServing {
    /// Another node leads: its gRPC address.
    Leader(String),
    /// No leader is known (an election, or no quorum).
    NoLeader,
}

impl Group {
    /// A group handle over `raft`, committing with a task of its own that
    /// publishes through `announce` what went through the log.
    pub fn new(raft: Raft, id: NodeId, timing: Timing, announce: Announcer) -> Group {
        Group {
            committer: commit::Committer::spawn(raft.clone(), move |b| announce.durable(b)),
            raft,
            id,
            timing,
            standing: Arc::new(Mutex::new(Standing::default())),
        }
    }

    /// A copy of where this node stands.
    pub fn standing(&self) -> Standing {
        self.standing.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Standing)) {
        if let Ok(mut s) = self.standing.lock() {
            f(&mut s);
        }
    }

    /// Whether this node is still the leader of `term`.
    pub fn leads_term(&self, term: u64) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_term == term && m.state == ServerState::Leader
    }

    /// `Ok` when this node may serve the `Meta` API at `now`: it is the
    /// leader, done with its start-up for this term, and a quorum
    /// acknowledged it within the leader lease.
    pub fn serving(&self, now: Instant) -> Result<(), NotServing> {
        let m = self.raft.metrics().borrow().clone();
        let s = self.standing();
        let lease = self.timing.leader_lease();
        let leading = m.state == ServerState::Leader
            && m.current_leader == Some(self.id)
            && s.serving_term == Some(m.current_term)
            && s.quorum_ack
                .is_some_and(|t| now.saturating_duration_since(t) < lease);
        if leading {
            return Ok(());
        }
        match m.current_leader {
            Some(l) if l != self.id => match m.membership_config.membership().get_node(&l) {
                Some(n) => Err(NotServing::Leader(n.addr.clone())),
                None => Err(NotServing::NoLeader),
            },
            _ => Err(NotServing::NoLeader),
        }
    }

    /// Wait (at most `bound`) until this node serves; whether it does.
    pub async fn wait_serving(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            if self.serving(Instant::now()).is_ok() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The members: (id, address, voter).
    pub fn members(&self) -> Vec<(NodeId, String, bool)> {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        mem.nodes()
            .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
            .collect()
    }
}

/// The initial voters from `--peers` (`id=host:port,...`).
pub fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, BasicNode>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("peer {part:?} is not id=host:port"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("peer id {id:?} is not a number"))?;
        if id == 0 {
            return Err("peer ids start at 1".into());
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!("peer address {addr:?} is not host:port"));
        }
        if out.insert(id, BasicNode::new(addr)).is_some() {
            return Err(format!("peer id {id} is given twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_refuse_bad_ones() {
        let p = parse_peers("1=127.0.0.1:7000, 2=127.0.0.1:7001,3=meta3:7000").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[&3].addr, "meta3:7000");
        for bad in ["1", "x=a:1", "0=a:1", "1=a", "1=a:1,1=b:2", "1=:7"] {
            assert!(parse_peers(bad).is_err(), "{bad}");
        }
        assert!(parse_peers("").unwrap().is_empty());
    }

    #[test]
    fn the_leader_lease_ends_before_any_follower_may_stand() {
        let t = Timing::default();
        assert!(t.leader_lease() < t.election_max());
        let c = t.config().validate().unwrap();
        assert!(c.heartbeat_interval < c.election_timeout_min);
    }
}
