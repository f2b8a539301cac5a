//! Concurrency helpers: per-volume operation locks (a second operation on a
//! busy volume gets ABORTED, as the CSI spec asks) and single-flight
//! coalescing of identical in-flight work (one iscsiadm login per portal and
//! target however many stages wait for it).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::{BoxFuture, FutureExt, Shared};

use crate::error::{CsiError, Result};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The set of keys (volume ids, names) with an operation in flight. No
/// global lock is held while an operation runs.
#[derive(Default, Debug)]
pub struct VolumeLocks {
    held: Mutex<HashSet<String>>,
}

/// Held while an operation on one key runs; released on drop.
#[derive(Debug)]
pub struct VolumeGuard {
    locks: Arc<VolumeLocks>,
    key: String,
}

impl VolumeLocks {
    /// A new, empty lock table.
    pub fn new() -> Arc<VolumeLocks> {
        Arc::new(VolumeLocks::default())
    }

    /// Takes the lock on `key`, or ABORTED when an operation holds it.
    pub fn try_lock(self: &Arc<Self>, key: &str) -> Result<VolumeGuard> {
        if !lock(&self.held).insert(key.to_string()) {
            return Err(CsiError::Aborted(format!(
                "an operation on {key} is already in progress"
            )));
        }
        Ok(VolumeGuard {
            locks: self.clone(),
            key: key.to_string(),
        })
    }

    /// Whether `key` is locked now.
    pub fn is_locked(&self, key: &str) -> bool {
        lock(&self.held).contains(key)
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        lock(&self.locks.held).remove(&self.key);
    }
}

type Flights<T> = Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, T>>>>>;

/// Coalesces concurrent calls with the same key into one execution; every
/// caller gets (a clone of) its result. A call that starts after the
/// execution finished runs again.
pub struct SingleFlight<T: Clone + Send + Sync + 'static> {
    flights: Flights<T>,
}

impl<T: Clone + Send + Sync + 'static> Default for SingleFlight<T> {
    fn default() -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// Runs `work` unless a call with `key` is in flight, whose result is
    /// then shared. The execution continues even if every caller goes away.
    pub async fn run<F>(&self, key: &str, work: F) -> T
    where
        F: Future<Output = T> + Send + 'static,
    {
        let shared = {
            let mut flights = lock(&self.flights);
            if let Some(f) = flights.get(key) {
                f.clone()
            } else {
                let map = self.flights.clone();
                let k = key.to_string();
                let task = tokio::spawn(work);
                let fut = async move {
                    let out = task.await;
                    lock(&map).remove(&k);
                    out
                }
                .boxed();
                // A panicked task is surfaced to every waiter as a panic.
                let fut: BoxFuture<'static, T> = fut
                    .map(|r| match r {
                        Ok(v) => v,
                        Err(e) => std::panic::resume_unwind(e.into_panic()),
                    })
                    .boxed();
                let s = fut.shared();
                flights.insert(key.to_string(), s.clone());
                s
            }
        };
        shared.await
    }

    /// Number of executions in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn second_lock_on_same_key_is_aborted() {
        let l = VolumeLocks::new();
        let g = l.try_lock("v1").unwrap();
        assert_eq!(l.try_lock("v1").unwrap_err().code(), tonic::Code::Aborted);
        let _other = l.try_lock("v2").unwrap();
        drop(g);
        assert!(l.try_lock("v1").is_ok());
    }

    #[tokio::test]
    async fn single_flight_coalesces() {
        let sf = Arc::new(SingleFlight::<u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..20 {
            let sf = sf.clone();
            let runs = runs.clone();
            handles.push(tokio::spawn(async move {
                sf.run("k", async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    7
                })
                .await
            }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap(), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(sf.in_flight(), 0);
        // A later call runs again.
        let runs2 = runs.clone();
        sf.run("k", async move {
            runs2.fetch_add(1, Ordering::SeqCst);
            1
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
