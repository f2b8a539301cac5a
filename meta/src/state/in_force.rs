//! What meta acknowledges is in force: the lease rule that bounds how long
//! a chunk or a VIP holder may serve on a view older than a change a call
//! has returned for.
//!
//! A call that changes what initiators may see (ACL add/remove/mode, volume
//! create/delete/resize, snapshot) *requires* its revision R at commit time
//! `t(R)`, then waits until every participant (alive chunk, VIP holder) has
//! acknowledged applying R, or its lease has run out. Participants serve
//! only under a lease meta grants with each heartbeat (chunks) or renewal
//! (redirectors), counted from the participant's own send time, so it runs
//! out no later than meta believes. This module decides those leases:
//!
//! - caught up with every required revision: the full lease;
//! - behind a required R younger than the bound: at most until
//!   `t(R) + bound`;
//! - behind a required R older than the bound: nothing (fenced out until it
//!   has caught up).
//!
//! Every lease granted before `t(R)` ends before `t(R) + full`, every one
//! granted later to a participant behind R ends by `t(R) + bound`; with
//! `bound == full` a call's wait is over within `bound` of its commit,
//! whatever the participants do. Pure: time comes in as arguments.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The required revisions of the last `bound`, and the newest older one.
#[derive(Debug)]
pub struct InForce {
    bound: Duration,
    /// (revision, commit time), both increasing.
    pending: VecDeque<(u64, Instant)>,
    /// Every participant must have applied this (required longer than
    /// `bound` ago) to hold any lease.
    floor: u64,
}

impl InForce {
    /// No revision required yet; `bound` is how long a participant may lag.
    pub fn new(bound: Duration) -> Self {
        InForce {
            bound,
            pending: VecDeque::new(),
            floor: 0,
        }
    }

    /// How long a participant may lag behind a required revision.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// Revision `revision` (committed at `now`, or earlier) must be in
    /// force before the call that made it returns. Requiring a revision
    /// already required keeps the earlier commit time (stricter).
    pub fn require(&mut self, revision: u64, now: Instant) {
        self.prune(now);
        if revision <= self.floor || self.pending.back().is_some_and(|&(r, _)| r >= revision) {
            return;
        }
        self.pending.push_back((revision, now));
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&(r, t)) = self.pending.front() {
            if now.saturating_duration_since(t) < self.bound {
                break;
            }
            self.floor = self.floor.max(r);
            self.pending.pop_front();
        }
    }

    /// The lease for a participant that has applied `applied`, asked at
    /// `now`: `full` when caught up, shorter while behind, zero when behind
    /// a revision required longer than the bound ago.
    pub fn lease(&mut self, applied: u64, full: Duration, now: Instant) -> Duration {
        self.prune(now);
        if applied < self.floor {
            return Duration::ZERO;
        }
        match self.pending.iter().find(|&&(r, _)| r > applied) {
            Some(&(_, t)) => (t + self.bound).saturating_duration_since(now).min(full),
            None => full,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn caught_up_participants_get_the_full_lease() {
        let t0 = Instant::now();
        let mut f = InForce::new(3 * S);
        assert_eq!(f.lease(0, 3 * S, t0), 3 * S);
        f.require(5, t0);
        assert_eq!(f.lease(5, 3 * S, t0), 3 * S);
        assert_eq!(f.lease(9, 3 * S, t0 + 10 * S), 3 * S);
    }

    #[test]
    fn a_lagging_participant_never_holds_past_the_bound() {
        let t0 = Instant::now();
        let mut f = InForce::new(3 * S);
        f.require(5, t0);
        assert_eq!(f.lease(4, 3 * S, t0), 3 * S);
        assert_eq!(f.lease(4, 3 * S, t0 + S), 2 * S);
        // The cap holds whatever the participant asks for.
        assert_eq!(f.lease(4, 10 * S, t0 + S), 2 * S);
        // Past the bound: fenced out until it has applied 5.
        assert_eq!(f.lease(4, 3 * S, t0 + 3 * S), Duration::ZERO);
        assert_eq!(f.lease(4, 3 * S, t0 + 30 * S), Duration::ZERO);
        assert_eq!(f.lease(5, 3 * S, t0 + 30 * S), 3 * S);
    }

    #[test]
    fn the_oldest_revision_a_participant_lacks_sets_its_cap() {
        let t0 = Instant::now();
        let mut f = InForce::new(3 * S);
        f.require(5, t0);
        f.require(7, t0 + 2 * S);
        assert_eq!(f.lease(4, 3 * S, t0 + 2 * S), S);
        assert_eq!(f.lease(6, 3 * S, t0 + 2 * S), 3 * S);
        // 5 is past the bound, 7 is not.
        assert_eq!(f.lease(4, 3 * S, t0 + 4 * S), Duration::ZERO);
        assert_eq!(f.lease(6, 3 * S, t0 + 4 * S), S);
        assert_eq!(f.lease(7, 3 * S, t0 + 4 * S), 3 * S);
    }

    #[test]
    fn requiring_again_keeps_the_first_commit_time() {
        let t0 = Instant::now();
        let mut f = InForce::new(3 * S);
        f.require(5, t0);
        f.require(5, t0 + 2 * S);
        f.require(4, t0 + 2 * S);
        assert_eq!(f.lease(4, 3 * S, t0 + 2 * S), S);
    }

    #[test]
    fn every_lease_ends_within_the_bound_of_a_commit_for_a_lagging_participant() {
        // Leases granted at any time to a participant that never applies
        // the required revision end by commit + bound.
        let t0 = Instant::now();
        let bound = 3 * S;
        let mut f = InForce::new(bound);
        let commit = t0 + 5 * S;
        let mut latest_end = t0;
        for ms in (0..20_000).step_by(37) {
            let now = t0 + Duration::from_millis(ms);
            if now >= commit {
                f.require(8, commit);
            }
            // A zero lease extends nothing.
            let lease = f.lease(7, bound, now);
            if lease.is_zero() {
                assert!(
                    now >= commit + bound,
                    "fenced out at {ms} ms, before the bound"
                );
                continue;
            }
            let end = now + lease;
            if now >= commit {
                assert!(end <= commit + bound, "at {ms} ms the lease ends late");
            }
            latest_end = latest_end.max(end);
        }
        assert!(latest_end <= commit + bound);
    }
}
