//! Hang detection for replica peers.
//!
//! A frozen peer (SIGSTOP, a hung host, a partition that keeps the TCP
//! connection up) answers nothing, and a call to it would otherwise wait
//! out the whole peer timeout (10 s). A slow peer (a busy disk, a long
//! copy-up) answers late but answers. The two look alike from the data
//! connection, so this module tells them apart in two steps:
//!
//! 1. **Suspicion**: a call that has waited [`suspect_after`] (a few times
//!    the peer's observed p99 latency, bounded to
//!    [`SUSPECT_MIN`]..=[`SUSPECT_MAX`]) makes its peer a suspect.
//! 2. **Probe**: the suspect is pinged on a path that never queues behind
//!    its data path ([`crate::replica::ReplicaPeer::ping`]; the network
//!    peer uses a connection of its own, answered without touching the
//!    store). No answer within [`PROBE_TIMEOUT`] is the verdict *hung*: the
//!    call fails as unreachable and the volume removes the member through
//!    meta (epoch bump) and acknowledges the write on the remaining set. An
//!    answer means *alive but slow*: the call goes on waiting, probed again
//!    after each further [`suspect_after`], up to the peer timeout as before.
//!
//! So a busy peer is never dropped for being slow, and a frozen one costs a
//! write at most `suspect_after + PROBE_TIMEOUT` (0.8–1.5 s). Probes are
//! single-flight per peer: the calls that suspect a peer at once share one
//! probe, and a *hung* verdict is reused for [`HUNG_REUSE`] as long as no
//! call to the peer has succeeded since, so the other extents' writes to a
//! hung peer fail over at once instead of each waiting for a probe.
//!
//! A peer with calls in flight is also probed every [`WATCH_EVERY`] by a
//! task of its own (`MetaPeers::watch_busy`), whatever its latency: a peer
//! that freezes under a write is then found within about
//! `WATCH_EVERY + PROBE_TIMEOUT` (0.75 s), and the failed probe closes its
//! connections, so every call waiting on it fails over at once instead of
//! waiting for its own suspicion. Idle peers are not pinged.
//!
//! [`suspect_after`] and the latency window are pure and tested here; the
//! volume (`crate::volume`) is the I/O shell.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A call is never suspected sooner than this.
pub const SUSPECT_MIN: Duration = Duration::from_millis(300);
/// A call is always suspected after this long.
pub const SUSPECT_MAX: Duration = Duration::from_secs(1);
/// Suspicion comes after this many times the observed p99.
pub const SUSPECT_FACTOR: u32 = 4;
/// A probe that gets no answer within this is the verdict *hung*.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Extra time the prober gives a ping beyond [`PROBE_TIMEOUT`] (the ping
/// bounds itself by it and cleans up on expiry).
const PROBE_GRACE: Duration = Duration::from_millis(100);
/// A *hung* verdict stands this long unless a call succeeds meanwhile.
pub const HUNG_REUSE: Duration = Duration::from_secs(1);
/// An *alive* verdict is reused this long (a burst of suspicious calls
/// sends one probe).
pub const ALIVE_REUSE: Duration = Duration::from_millis(100);
/// How often a peer with calls in flight is probed in the background.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Samples before the p99 is trusted; until then calls wait [`SUSPECT_MAX`].
pub const MIN_SAMPLES: u64 = 64;

/// Histogram buckets: bucket `i` holds latencies up to `BASE_US * 2^(i/2)`
/// microseconds (half-octave steps from 16 µs to about 190 s).
const BUCKETS: usize = 48;
const BASE_US: f64 = 16.0;
/// Every this many samples all buckets are halved (older samples fade) and
/// the p99 is recomputed.
const DECAY_EVERY: u64 = 512;

/// When a call that is still waiting makes its peer a suspect:
/// [`SUSPECT_FACTOR`] times `p99`, within [`SUSPECT_MIN`]..=[`SUSPECT_MAX`];
/// [`SUSPECT_MAX`] while there is no p99 yet.
pub fn suspect_after(p99: Option<Duration>) -> Duration {
    match p99 {
        None => SUSPECT_MAX,
        Some(p) => p
            .saturating_mul(SUSPECT_FACTOR)
            .clamp(SUSPECT_MIN, SUSPECT_MAX),
    }
}

/// The bucket of a latency.
fn bucket(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us <= BASE_US {
        return 0;
    }
    let i = (2.0 * (us / BASE_US).log2()).ceil();
    if i.is_finite() && i >= 0.0 {
        (i as usize).min(BUCKETS - 1)
    } else {
        BUCKETS - 1
    }
}

/// The upper bound of bucket `i`.
fn bucket_bound(i: usize) -> Duration {
    Duration::from_secs_f64(BASE_US * 2f64.powf(i as f64 / 2.0) / 1e6)
}

/// The smallest bucket bound at or above `q` (0..1) of the samples in
/// `counts`; `None` without samples.
pub fn quantile(counts: &[u32], q: f64) -> Option<Duration> {
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        seen += u64::from(c);
        if seen >= want {
            return Some(bucket_bound(i));
        }
    }
    Some(bucket_bound(counts.len().saturating_sub(1)))
}

/// The verdict of the last probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Alive,
    /// With the count of successful calls when it was reached.
    Hung {
        successes: u64,
    },
}

/// Latency window and probe state of one peer (lock-free on the call path).
#[derive(Debug)]
pub struct PeerHealth {
    counts: [AtomicU32; BUCKETS],
    samples: AtomicU64,
    /// The current p99 in microseconds; 0: not known yet.
    p99_us: AtomicU64,
    /// Calls that succeeded (a *hung* verdict from before one is void).
    successes: AtomicU64,
    /// Probes that found the peer hung.
    hung_verdicts: AtomicU64,
    /// Calls waiting for the peer now.
    in_flight: AtomicU64,
    last: tokio::sync::Mutex<Option<(Instant, Verdict)>>,
}

/// A call in flight to a peer (see [`PeerHealth::call_started`]).
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for PeerHealth {
    fn default() -> Self {
        PeerHealth {
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
            samples: AtomicU64::new(0),
            p99_us: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            hung_verdicts: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last: tokio::sync::Mutex::new(None),
        }
    }
}

impl PeerHealth {
    /// Record a call that got an answer (any answer from the peer: data, or
    /// a verdict such as a stale epoch) after `latency`.
    pub fn answered(&self, latency: Duration) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        self.counts[bucket(latency)].fetch_add(1, Ordering::Relaxed);
        let n = self.samples.fetch_add(1, Ordering::Relaxed) + 1;
        if n == MIN_SAMPLES || n.is_multiple_of(DECAY_EVERY) {
            let snapshot: Vec<u32> = self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            if let Some(p) = quantile(&snapshot, 0.99) {
                let us = u64::try_from(p.as_micros()).unwrap_or(u64::MAX).max(1);
                self.p99_us.store(us, Ordering::Relaxed);
            }
            if n.is_multiple_of(DECAY_EVERY) {
                for c in &self.counts {
                    // Racy with concurrent increments by design: a sample
                    // may be halved or not; the window stays approximate.
                    let v = c.load(Ordering::Relaxed);
                    c.store(v / 2, Ordering::Relaxed);
                }
            }
        }
    }

    /// Count a call as in flight until the guard is dropped.
    pub fn call_started(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Whether calls wait for the peer now (the background watch probes
    /// only such peers).
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// The observed p99, once [`MIN_SAMPLES`] calls were answered.
    pub fn p99(&self) -> Option<Duration> {
        match self.p99_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// How long a call waits before its peer is probed: zero while a fresh
    /// *hung* verdict stands (the probe then answers at once), else
    /// [`suspect_after`] of the p99.
    pub fn suspect_after(&self) -> Duration {
        if let Ok(last) = self.last.try_lock() {
            if self.stands_hung(&last, Instant::now()) {
                return Duration::ZERO;
            }
        }
        suspect_after(self.p99())
    }

    /// Probes that found the peer hung, since start.
    pub fn hung_verdicts(&self) -> u64 {
        self.hung_verdicts.load(Ordering::Relaxed)
    }

    fn stands_hung(&self, last: &Option<(Instant, Verdict)>, now: Instant) -> bool {
        matches!(last, Some((at, Verdict::Hung { successes }))
            if now.duration_since(*at) < HUNG_REUSE
                && *successes == self.successes.load(Ordering::Relaxed))
    }

    /// Whether the peer answers: `ping` bounded by [`PROBE_TIMEOUT`], one at
    /// a time, with the last verdict reused while it is fresh (see the
    /// module docs). `Err` carries why the peer counts as hung.
    pub async fn probe<F, Fut, E>(&self, ping: F) -> Result<(), String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut last = self.last.lock().await;
        let now = Instant::now();
        match *last {
            Some((at, Verdict::Alive)) if now.duration_since(at) < ALIVE_REUSE => return Ok(()),
            _ if self.stands_hung(&last, now) => {
                return Err(format!(
                    "no answer to a probe {:?} ago",
                    now.duration_since(last.map(|(at, _)| at).unwrap_or(now))
                ))
            }
            _ => {}
        }
        let successes = self.successes.load(Ordering::Relaxed);
        let verdict = match tokio::time::timeout(PROBE_TIMEOUT + PROBE_GRACE, ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("probe failed: {e}")),
            Err(_) => Err(format!("no answer to a probe within {PROBE_TIMEOUT:?}")),
        };
        let v = match verdict {
            Ok(()) => Verdict::Alive,
            Err(_) => {
                self.hung_verdicts.fetch_add(1, Ordering::Relaxed);
                Verdict::Hung { successes }
            }
        };
        *last = Some((Instant::now(), v));
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspicion_is_a_few_p99s_within_bounds() {
        assert_eq!(suspect_after(None), SUSPECT_MAX);
        assert_eq!(suspect_after(Some(Duration::from_micros(200))), SUSPECT_MIN);
        assert_eq!(
            suspect_after(Some(Duration::from_millis(100))),
            Duration::from_millis(400)
        );
        assert_eq!(suspect_after(Some(Duration::from_secs(2))), SUSPECT_MAX);
        assert_eq!(suspect_after(Some(Duration::MAX)), SUSPECT_MAX);
    }

    #[test]
    fn buckets_bound_their_latencies() {
        for us in [0u64, 1, 16, 17, 100, 1000, 12_345, 1_000_000, 99_000_000] {
            let d = Duration::from_micros(us);
            let b = bucket(d);
            assert!(bucket_bound(b) >= d, "{us} µs in bucket {b}");
            if b > 0 {
                assert!(bucket_bound(b - 1) < d, "{us} µs belongs lower than {b}");
            }
        }
        assert_eq!(bucket(Duration::from_secs(100_000)), BUCKETS - 1);
    }

    #[test]
    fn the_p99_follows_the_slow_tail() {
        let mut counts = [0u32; BUCKETS];
        counts[bucket(Duration::from_micros(100))] = 990;
        assert_eq!(
            quantile(&counts, 0.99),
            Some(bucket_bound(bucket(Duration::from_micros(100))))
        );
        counts[bucket(Duration::from_millis(50))] = 20;
        let p = quantile(&counts, 0.99).unwrap();
        assert!(
            p >= Duration::from_millis(50) && p < Duration::from_millis(71),
            "{p:?}"
        );
        assert_eq!(quantile(&[0; BUCKETS], 0.99), None);
    }

    #[test]
    fn the_window_learns_and_fades() {
        let h = PeerHealth::default();
        assert_eq!(h.p99(), None);
        assert_eq!(h.suspect_after(), SUSPECT_MAX);
        for _ in 0..MIN_SAMPLES {
            h.answered(Duration::from_millis(2));
        }
        let p = h.p99().expect("p99 after the minimum samples");
        assert!(
            p >= Duration::from_millis(2) && p < Duration::from_millis(3),
            "{p:?}"
        );
        assert_eq!(h.suspect_after(), SUSPECT_MIN);
        // A slower regime replaces the old one within a few decay steps.
        for _ in 0..DECAY_EVERY * 4 {
            h.answered(Duration::from_millis(150));
        }
        let p = h.p99().unwrap();
        assert!(p >= Duration::from_millis(150), "{p:?}");
        assert!(h.suspect_after() >= Duration::from_millis(600));
    }

    #[tokio::test]
    async fn a_silent_peer_is_hung_and_the_verdict_is_shared_until_a_call_succeeds() {
        let h = PeerHealth::default();
        let r = h
            .probe(|| async { std::future::pending::<Result<(), String>>().await })
            .await;
        assert!(r.unwrap_err().contains("no answer"));
        assert_eq!(h.hung_verdicts(), 1);
        assert_eq!(h.suspect_after(), Duration::ZERO);
        // Reused: this ping would answer, but is never sent.
        let r = h
            .probe(|| async { panic!("a fresh hung verdict must be reused") as Result<(), String> })
            .await;
        assert!(r.is_err());
        // A call that succeeds voids the verdict.
        h.answered(Duration::from_millis(1));
        assert_eq!(h.suspect_after(), SUSPECT_MAX);
        assert_eq!(h.probe(|| async { Ok::<(), String>(()) }).await, Ok(()));
        assert_eq!(h.hung_verdicts(), 1);
    }

    #[tokio::test]
    async fn a_peer_that_answers_the_probe_is_alive_and_a_refusing_one_is_not() {
        let h = PeerHealth::default();
        assert_eq!(h.probe(|| async { Ok::<(), String>(()) }).await, Ok(()));
        assert_eq!(h.hung_verdicts(), 0);
        assert_eq!(h.suspect_after(), SUSPECT_MAX);
        let other = PeerHealth::default();
        let r = other
            .probe(|| async { Err::<(), _>("connection refused") })
            .await;
        assert!(r.unwrap_err().contains("connection refused"));
        assert_eq!(other.hung_verdicts(), 1);
    }

    #[test]
    fn a_peer_is_busy_while_a_call_is_in_flight() {
        let h = PeerHealth::default();
        assert!(!h.busy());
        let a = h.call_started();
        let b = h.call_started();
        assert!(h.busy());
        drop(a);
        assert!(h.busy());
        drop(b);
        assert!(!h.busy());
    }
}
