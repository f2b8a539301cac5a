//! Group commit: the leader's changes go through the log in batches, and
//! the state lock is never held while they do.
//!
//! A call decides its change under the state lock (memory runs ahead of
//! the log: a speculative revision), hands the batches to the
//! [`Committer`] still under that lock, so the log order is the decision
//! order, and lets the lock go. One task puts what has queued up through
//! openraft as one entry, waits for it, then takes everything that queued
//! meanwhile: however many calls arrive during a round trip, the next round
//! trip carries them all.
//!
//! Nothing speculative leaves meta. Every call that took the lock answers
//! only once the newest change it could have seen is durable (its
//! [`Ticket`]; see `service.rs`), and the revision chunks and redirectors
//! are told about ([`crate::state::Announcer`]) is the durable one.
//!
//! Why the chain stays true: a batch applies only on exactly the revision
//! it was decided at. Once any entry fails (no quorum, a lost leadership, a
//! conflict), memory may hold a line the log never took, so the committer
//! moves to a new epoch: everything queued and not yet proposed fails
//! without entering the log, a submission decided in an older epoch is
//! refused, and the next holder of the state lock reloads memory from what
//! is applied before it decides anything ([`Committer::begin`]). With one
//! entry in flight at a time, a batch is proposed only when every earlier
//! batch of its epoch went through.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{Outcome, Proposal, Raft};
use crate::state::Batch;

/// The longest one entry waits for a quorum. A leader that lost its
/// quorum would otherwise wait for ever; the entry may still commit later
/// (memory then catches up from the log, see the module doc).
pub const REPLICATE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most batches one log entry carries; more wait for the next.
const MAX_BATCHES_PER_ENTRY: usize = 256;

/// Why a change did not go through the log. Every case is retryable: the
/// change took effect or it did not, and every mutation is idempotent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// This node no longer leads: the leader's address, if known.
    #[error("this meta node no longer leads the group")]
    NotLeader(Option<String>),
    /// The batch was decided at `decided` but the log was at `found`.
    #[error("the change was decided at revision {decided} but the log was at {found}; retry")]
    Conflict {
        /// The revision the batch was decided at.
        decided: u64,
        /// The revision the log had.
        found: u64,
    },
    /// No quorum took the entry in time.
    #[error("the change was not committed within {REPLICATE_TIMEOUT:?} (no quorum?); retry")]
    Timeout,
    /// An earlier change this one was decided on top of did not go
    /// through, so this one never entered the log.
    #[error("an earlier change did not go through the meta group's log, so this one was not proposed; retry")]
    Abandoned,
    /// openraft refused the entry.
    #[error("meta group: {0}; retry")]
    Raft(String),
}

/// Where the committer's entries go: the meta group's openraft log (a
/// script in the unit tests).
pub trait Log: Send + Sync + 'static {
    /// Put `batches` through the log as one entry; what applying it did.
    fn propose(&self, batches: Vec<Batch>) -> Proposing<'_>;
}

/// The future [`Log::propose`] returns.
pub type Proposing<'a> = Pin<Box<dyn Future<Output = Result<Outcome, CommitError>> + Send + 'a>>;

impl Log for Raft {
    fn propose(&self, batches: Vec<Batch>) -> Proposing<'_> {
        Box::pin(async move {
            let write =
                tokio::time::timeout(REPLICATE_TIMEOUT, self.client_write(Proposal { batches }));
            match write.await {
                Err(_) => Err(CommitError::Timeout),
                Ok(Ok(r)) => Ok(r.data),
                Ok(Err(openraft::error::RaftError::APIError(
                    openraft::error::ClientWriteError::ForwardToLeader(f),
                ))) => Err(CommitError::NotLeader(f.leader_node.map(|n| n.addr))),
                Ok(Err(e)) => Err(CommitError::Raft(e.to_string())),
            }
        })
    }
}

/// The outcome of one submission, once known.
#[derive(Clone, Debug)]
pub struct Ticket(watch::Receiver<Option<Result<(), CommitError>>>);

impl Ticket {
    /// Wait until the submission went through the log (or did not).
    pub async fn wait(mut self) -> Result<(), CommitError> {
        match self.0.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or(Err(CommitError::Abandoned)),
            // The committer is gone (shutdown) without an answer.
            Err(_) => Err(CommitError::Abandoned),
        }
    }

    /// Whether `other` is the same submission's ticket.
    pub fn same(&self, other: &Ticket) -> bool {
        self.0.same_channel(&other.0)
    }

    /// The outcome, if already known.
    pub fn peek(&self) -> Option<Result<(), CommitError>> {
        self.0.borrow().clone()
    }
}

/// What a holder of the state lock must do first ([`Committer::begin`]).
#[derive(Debug)]
pub struct Begin {
    /// An entry failed since the last holder: reload memory from what is
    /// applied before deciding anything.
    pub reload: bool,
    /// The newest submission whose changes memory may hold: a call that
    /// reads memory answers only once it settled.
    pub latest: Option<Ticket>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Bumped on every failed entry.
    epoch: u64,
    /// The epoch the current holder of the state lock decides in.
    holder_epoch: u64,
    /// An entry failed and memory was not reloaded since.
    reload: bool,
    latest: Option<Ticket>,
}

struct Submission {
    epoch: u64,
    batches: Vec<Batch>,
    done: watch::Sender<Option<Result<(), CommitError>>>,
}

/// The leader's path into the log (see the module doc). Cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::UnboundedSender<Submission>,
    shared: Arc<Mutex<Shared>>,
}

impl Committer {
    /// Start the committer's task over `log`; `announce` publishes what
    /// went through (the leader's [`crate::state::Announcer`]).
    pub fn spawn(log: impl Log, announce: impl Fn(&[Batch]) + Send + Sync + 'static) -> Committer {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(Shared::default()));
        tokio::spawn(run(log, announce, rx, shared.clone()));
        Committer { tx, shared }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by each holder of the state lock right after taking it:
    /// whether to reload memory first, and the newest submission memory
    /// may hold. After a reload memory holds nothing unsettled.
    pub fn begin(&self) -> Begin {
        let mut s = self.shared();
        s.holder_epoch = s.epoch;
        let reload = std::mem::take(&mut s.reload);
        if reload {
            s.latest = None;
        }
        Begin {
            reload,
            latest: s.latest.clone(),
        }
    }

    /// Memory could not be reloaded after all (the store failed to read):
    /// the next holder of the state lock tries again.
    pub fn reload_pending(&self) {
        self.shared().reload = true;
    }

    /// Queue `batches` (what the current holder of the state lock decided,
    /// in order) for the log; call under that lock.
    pub fn submit(&self, batches: Vec<Batch>) -> Ticket {
        let (done, rx) = watch::channel(None);
        let ticket = Ticket(rx);
        let mut s = self.shared();
        let sub = Submission {
            epoch: s.holder_epoch,
            batches,
            done,
        };
        if let Err(mpsc::error::SendError(sub)) = self.tx.send(sub) {
            sub.done.send_replace(Some(Err(CommitError::Abandoned)));
        }
        s.latest = Some(ticket.clone());
        ticket
    }
}

/// How the submissions of one entry fared, given what applying it did:
/// the first `applied` batches went through, in order, and each submission
/// holds `sizes[i]` of them. A submission went through only if all its
/// batches did.
pub fn settle(
    outcome: &Result<Outcome, CommitError>,
    sizes: &[usize],
) -> Vec<Result<(), CommitError>> {
    let mut left = match outcome {
        Ok(o) => o.applied,
        Err(_) => 0,
    };
    sizes
        .iter()
        .map(|&n| match outcome {
            Err(e) => Err(e.clone()),
            Ok(_) if n <= left => {
                left -= n;
                Ok(())
            }
            Ok(o) => {
                left = 0;
                let (decided, found) = o.conflict.unwrap_or((0, o.revision));
                Err(CommitError::Conflict { decided, found })
            }
        })
        .collect()
}

/// Whether an entry's outcome leaves memory off the log's line.
fn failed(outcome: &Result<Outcome, CommitError>) -> bool {
    match outcome {
        Ok(o) => o.conflict.is_some(),
        Err(_) => true,
    }
}

async fn run(
    log: impl Log,
    announce: impl Fn(&[Batch]),
    mut rx: mpsc::UnboundedReceiver<Submission>,
    shared: Arc<Mutex<Shared>>,
) {
    let epoch_now = |s: &Arc<Mutex<Shared>>| s.lock().unwrap_or_else(|e| e.into_inner()).epoch;
    while let Some(first) = rx.recv().await {
        let mut subs = vec![first];
        let mut count = subs[0].batches.len();
        while count < MAX_BATCHES_PER_ENTRY {
            match rx.try_recv() {
                Ok(s) => {
                    count += s.batches.len();
                    subs.push(s);
                }
                Err(_) => break,
            }
        }
        // Decided on a line an earlier failure ended: never proposed.
        let epoch = epoch_now(&shared);
        let (stale, mut subs): (Vec<_>, Vec<_>) = subs.into_iter().partition(|s| s.epoch != epoch);
        for s in stale {
            s.done.send_replace(Some(Err(CommitError::Abandoned)));
        }
        if subs.is_empty() {
            continue;
        }
        let sizes: Vec<usize> = subs.iter().map(|s| s.batches.len()).collect();
        let batches: Vec<Batch> = subs
            .iter_mut()
            .flat_map(|s| std::mem::take(&mut s.batches))
            .collect();
        let outcome = log.propose(batches.clone()).await;
        let applied = match &outcome {
            Ok(o) => o.applied.min(batches.len()),
            Err(_) => 0,
        };
        announce(&batches[..applied]);
        if failed(&outcome) {
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            s.epoch += 1;
            s.reload = true;
            tracing::warn!(error = ?outcome.as_ref().err(), conflict = ?outcome.as_ref().ok().and_then(|o| o.conflict),
                "meta group: a change did not go through the log; memory reloads from what is applied");
        }
        for (sub, result) in subs.into_iter().zip(settle(&outcome, &sizes)) {
            sub.done.send_replace(Some(result));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(n: usize, conflict: Option<(u64, u64)>) -> Result<Outcome, CommitError> {
        Ok(Outcome {
            applied: n,
            revision: 10,
            conflict,
        })
    }

    #[test]
    fn every_submission_of_an_entry_that_applied_whole_went_through() {
        let r = settle(&applied(6, None), &[1, 3, 2]);
        assert_eq!(r, vec![Ok(()), Ok(()), Ok(())]);
    }

    #[test]
    fn a_conflict_fails_the_submission_it_hit_and_everything_after() {
        // Batches 0..4 applied; the conflict is in the second submission's
        // third batch.
        let r = settle(&applied(3, Some((12, 10))), &[1, 3, 2]);
        assert_eq!(r[0], Ok(()));
        let c = CommitError::Conflict {
            decided: 12,
            found: 10,
        };
        assert_eq!(r[1], Err(c.clone()));
        assert_eq!(r[2], Err(c));
    }

    #[test]
    fn a_failed_entry_fails_all_its_submissions() {
        let r = settle(&Err(CommitError::Timeout), &[2, 1]);
        assert_eq!(
            r,
            vec![Err(CommitError::Timeout), Err(CommitError::Timeout)]
        );
        assert!(failed(&Err(CommitError::Timeout)));
        assert!(failed(&applied(0, Some((1, 2)))));
        assert!(!failed(&applied(2, None)));
    }

    type Answer = tokio::sync::oneshot::Sender<Result<Outcome, CommitError>>;

    /// A log the test answers by hand: each entry's batches' base
    /// revisions, and where to send what applying it did.
    struct Scripted(mpsc::UnboundedSender<(Vec<u64>, Answer)>);

    impl Log for Scripted {
        fn propose(&self, batches: Vec<Batch>) -> Proposing<'_> {
            let bases = batches.iter().map(|b| b.base_revision).collect();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = self.0.send((bases, tx));
            Box::pin(async move { rx.await.unwrap_or(Err(CommitError::Abandoned)) })
        }
    }

    type Announced = Arc<Mutex<Vec<u64>>>;

    fn committer() -> (
        Committer,
        mpsc::UnboundedReceiver<(Vec<u64>, Answer)>,
        Announced,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let announced = Announced::default();
        let a = announced.clone();
        let c = Committer::spawn(Scripted(tx), move |b: &[Batch]| {
            a.lock().unwrap().extend(b.iter().map(|b| b.base_revision));
        });
        (c, rx, announced)
    }

    fn batch(base: u64) -> Vec<Batch> {
        vec![Batch {
            base_revision: base,
            ops: Vec::new(),
        }]
    }

    fn whole(n: usize) -> Result<Outcome, CommitError> {
        applied(n, None)
    }

    #[tokio::test]
    async fn changes_decided_while_an_entry_is_in_flight_share_the_next() {
        let (c, mut log, announced) = committer();
        c.begin();
        let first = c.submit(batch(1));
        let (bases, answer) = log.recv().await.unwrap();
        assert_eq!(bases, vec![1]);
        // Three more calls decide while the first entry is in flight.
        let rest: Vec<Ticket> = (2..5).map(|b| c.submit(batch(b))).collect();
        assert!(first.peek().is_none(), "settled before the log answered");
        answer.send(whole(1)).unwrap();
        assert_eq!(first.wait().await, Ok(()));
        let (bases, answer) = log.recv().await.unwrap();
        assert_eq!(bases, vec![2, 3, 4], "one entry for all three");
        answer.send(whole(3)).unwrap();
        for t in rest {
            assert_eq!(t.wait().await, Ok(()));
        }
        assert_eq!(*announced.lock().unwrap(), vec![1, 2, 3, 4]);
        // Nothing failed: memory needs no reload, and the newest
        // submission is what a reader waits for.
        let b = c.begin();
        assert!(!b.reload);
        assert_eq!(b.latest.and_then(|t| t.peek()), Some(Ok(())));
    }

    #[tokio::test]
    async fn after_a_failed_entry_nothing_decided_on_it_enters_the_log() {
        let (c, mut log, announced) = committer();
        c.begin();
        let first = c.submit(batch(1));
        let (_, answer) = log.recv().await.unwrap();
        let queued: Vec<Ticket> = (2..4).map(|b| c.submit(batch(b))).collect();
        answer.send(Err(CommitError::Timeout)).unwrap();
        assert_eq!(first.wait().await, Err(CommitError::Timeout));
        for t in queued {
            assert_eq!(t.wait().await, Err(CommitError::Abandoned));
        }
        // The holder that decided before the failure learned nothing of
        // it: what it submits now is refused too.
        let late = c.submit(batch(4));
        assert_eq!(late.wait().await, Err(CommitError::Abandoned));
        assert!(log.try_recv().is_err(), "an abandoned change was proposed");
        assert!(announced.lock().unwrap().is_empty());
        // The next holder reloads, and waits on nothing from before.
        let b = c.begin();
        assert!(b.reload);
        assert!(b.latest.is_none());
        assert!(!c.begin().reload, "one reload per failure");
        // Then it commits again.
        let next = c.submit(batch(1));
        let (bases, answer) = log.recv().await.unwrap();
        assert_eq!(bases, vec![1]);
        answer.send(whole(1)).unwrap();
        assert_eq!(next.wait().await, Ok(()));
        assert_eq!(*announced.lock().unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn a_conflict_settles_the_applied_prefix_and_fails_the_rest() {
        let (c, mut log, announced) = committer();
        c.begin();
        let first = c.submit(batch(1));
        let (_, answer) = log.recv().await.unwrap();
        let a = c.submit(batch(2));
        let b = c.submit(batch(3));
        answer.send(whole(1)).unwrap();
        assert_eq!(first.wait().await, Ok(()));
        let (bases, answer) = log.recv().await.unwrap();
        assert_eq!(bases, vec![2, 3]);
        answer.send(applied(1, Some((3, 9)))).unwrap();
        assert_eq!(a.wait().await, Ok(()));
        assert_eq!(
            b.wait().await,
            Err(CommitError::Conflict {
                decided: 3,
                found: 9
            })
        );
        assert_eq!(*announced.lock().unwrap(), vec![1, 2]);
        assert!(c.begin().reload);
    }
}
