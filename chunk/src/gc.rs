//! Pacing of the garbage collection a chunk runs when meta's revision moves
//! (see `Shared::gc_loop` in `node.rs`).
//!
//! Every applied revision asks for a full collection: meta may have dropped
//! this chunk from replica sets (a lowered replication factor, a drain,
//! rebalance or locality move), and the dropped copies should give their
//! space back without a restart. A full collection lists every extent meta
//! places on the chunk, so a burst of revisions (volume creates, ACL
//! changes) must not run one each: [`run_paced`] runs at most one per
//! interval and folds the requests that arrive meanwhile into one pending
//! run, which a timer starts as soon as the interval allows. A request is
//! never lost, only delayed by at most the interval.

use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Default pause between two full collections (`--gc-interval`).
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(5);

/// What a collection asks of the pacer when it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing more to do until the next request.
    Done,
    /// Run again (paced like a request): the collection failed, or kept
    /// extents that changed while meta was asked and must be judged again.
    Again,
}

/// Run `collect` each time `wanted` is notified, at most once per
/// `interval` (start to start; zero: no limit, requests are only folded
/// while a run is in progress). Requests arriving while a run waits or
/// runs are folded into one next run, started by a timer once the interval
/// has passed. `last` is when a collection last started outside the
/// pacer (start-up), if any. Returns when `stop` is cancelled.
pub async fn run_paced<F, Fut>(
    wanted: &Notify,
    interval: Duration,
    mut last: Option<Instant>,
    stop: &CancellationToken,
    mut collect: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Next>,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wanted.notified() => {}
        }
        if let Some(at) = last.and_then(|l| l.checked_add(interval)) {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        // Requests that arrived while this run waited are served by it
        // (it reads everything afresh): fold them in, so only a request
        // arriving from here on makes another run.
        let _ = wanted.notified().now_or_never();
        last = Some(Instant::now());
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            n = collect() => n,
        };
        if next == Next::Again {
            // A stored permit: the next turn of the loop takes it at once
            // and waits out the interval.
            wanted.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    /// A pacer under test.
    struct Paced {
        wanted: Arc<Notify>,
        /// Start times of the collections.
        runs: Arc<Mutex<Vec<Instant>>>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Paced {
        /// Cancels the pacer and waits (bounded) for it to return.
        async fn stop(self) {
            self.stop.cancel();
            assert!(tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .is_ok());
        }
    }

    /// Starts a pacer whose collections record their start times and
    /// answer from `answers` (then `Done`).
    fn start(interval: Duration, answers: Vec<Next>) -> Paced {
        let wanted = Arc::new(Notify::new());
        let runs = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        let task = {
            let (wanted, runs, stop) = (wanted.clone(), runs.clone(), stop.clone());
            tokio::spawn(async move {
                run_paced(&wanted, interval, None, &stop, || {
                    runs.lock().push(Instant::now());
                    let next = answers.lock().next().unwrap_or(Next::Done);
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        next
                    }
                })
                .await
            })
        };
        Paced {
            wanted,
            runs,
            stop,
            task,
        }
    }

    /// Waits (bounded) until `runs` holds at least `n` starts.
    async fn wait_runs(runs: &Mutex<Vec<Instant>>, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if runs.lock().len() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        runs.lock().len() >= n
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_requests_runs_at_most_once_per_interval_and_the_last_one_is_kept() {
        let interval = Duration::from_millis(300);
        let p = start(interval, vec![]);
        let (wanted, runs) = (&p.wanted, &p.runs);
        // Nothing asked, nothing run.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(runs.lock().is_empty());

        // 60 requests, one every 20 ms (about 1.2 s).
        let t0 = Instant::now();
        let mut last_request = t0;
        for _ in 0..60 {
            wanted.notify_one();
            last_request = Instant::now();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let burst = last_request - t0;
        // The request after the last run is still served, within the
        // interval (plus slack for a loaded machine).
        let deadline = Instant::now() + interval + Duration::from_secs(5);
        loop {
            if runs.lock().last().is_some_and(|r| *r >= last_request) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the last request was never served: runs {:?}",
                runs.lock().iter().map(|r| *r - t0).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Quiet again: no further runs.
        tokio::time::sleep(interval * 2).await;
        let starts = runs.lock().clone();
        for w in starts.windows(2) {
            assert!(
                w[1] - w[0] >= interval,
                "two runs {:?} apart (interval {interval:?})",
                w[1] - w[0]
            );
        }
        // The first request runs at once; the rest at most one per
        // interval over the burst, plus the pending one.
        let most = (burst.as_millis() / interval.as_millis()) as usize + 2;
        assert!(
            (2..=most).contains(&starts.len()),
            "{} runs for 60 requests over {burst:?} (at most {most}): {:?}",
            starts.len(),
            starts.iter().map(|r| *r - t0).collect::<Vec<_>>()
        );
        assert!(starts[0] - t0 < Duration::from_secs(2), "first run late");
        p.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_that_asks_again_is_repeated_after_the_interval() {
        let interval = Duration::from_millis(150);
        let p = start(interval, vec![Next::Again, Next::Again]);
        let (wanted, runs) = (&p.wanted, &p.runs);
        wanted.notify_one();
        assert!(
            wait_runs(runs, 3, Duration::from_secs(10)).await,
            "runs: {}",
            runs.lock().len()
        );
        tokio::time::sleep(interval * 3).await;
        let starts = runs.lock().clone();
        assert_eq!(starts.len(), 3, "one request, two retries, then quiet");
        for w in starts.windows(2) {
            assert!(w[1] - w[0] >= interval);
        }
        p.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_interval_runs_every_request_it_sees() {
        let p = start(Duration::ZERO, vec![]);
        let (wanted, runs) = (&p.wanted, &p.runs);
        for i in 1..=5 {
            wanted.notify_one();
            assert!(wait_runs(runs, i, Duration::from_secs(10)).await, "run {i}");
            // Let the run finish before the next request.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(runs.lock().len(), 5);
        p.stop().await;
    }
}
