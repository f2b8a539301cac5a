//! The clock seam: everything time-dependent asks a [`Clock`], so a
//! simulator can substitute its own time.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A source of monotonic and wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic now (liveness).
    fn now(&self) -> Instant;
    /// Wall-clock milliseconds since the Unix epoch (timestamps).
    fn unix_ms(&self) -> u64;
}

/// The real clock. Monotonic time comes from tokio, so a paused or simulated
/// tokio clock (e.g. under turmoil) is honoured.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}
