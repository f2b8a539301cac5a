//! Background scrubbing: walk every extent slowly, verify every block, report
//! bad blocks so the caller can repair them from a replica.
//!
//! The scrubber only finds and reports; fetching good data from another
//! member of the replica set and calling [`ExtentStore::repair`] belongs to
//! the replication layer, which receives [`BadBlock`]s on a channel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::store::{ExtentId, ExtentStore, StoreError};

/// Pacing of the scrubber.
#[derive(Clone, Debug)]
pub struct ScrubConfig {
    /// Sleep after each extent (bounds the I/O the scrubber adds).
    pub pause_between_extents: Duration,
    /// Sleep after a full pass over all extents.
    pub pause_between_passes: Duration,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            pause_between_extents: Duration::from_millis(200),
            pause_between_passes: Duration::from_secs(3600),
        }
    }
}

/// Counters of the scrubber (monotonic).
#[derive(Debug, Default)]
pub struct ScrubMetrics {
    pub passes: AtomicU64,
    pub extents_scrubbed: AtomicU64,
    pub bytes_scrubbed: AtomicU64,
    pub bad_blocks_found: AtomicU64,
    pub errors: AtomicU64,
}

/// A block that failed its checksum during scrubbing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadBlock {
    pub extent: ExtentId,
    pub block: u64,
}

/// What one pass found.
#[derive(Debug, Default)]
pub struct ScrubPass {
    pub extents: u64,
    pub bad: Vec<BadBlock>,
    /// Extents that could not be scrubbed (I/O error, corrupt files), with
    /// the error text. Extents deleted during the pass are not errors.
    pub errors: Vec<(ExtentId, String)>,
}

/// Walks all extents of a store, slowly.
#[derive(Debug)]
pub struct Scrubber {
    store: ExtentStore,
    cfg: ScrubConfig,
    metrics: Arc<ScrubMetrics>,
    reports: Option<mpsc::Sender<BadBlock>>,
}

impl Scrubber {
    pub fn new(store: ExtentStore, cfg: ScrubConfig) -> Scrubber {
        Scrubber {
            store,
            cfg,
            metrics: Arc::default(),
            reports: None,
        }
    }

    /// Also send every bad block found to `tx` (for repair).
    pub fn with_reports(mut self, tx: mpsc::Sender<BadBlock>) -> Scrubber {
        self.reports = Some(tx);
        self
    }

    pub fn metrics(&self) -> Arc<ScrubMetrics> {
        self.metrics.clone()
    }

    /// One pass over every extent that exists when the pass starts.
    pub async fn run_pass(&self) -> ScrubPass {
        let mut pass = ScrubPass::default();
        let extents = self.store.extent_info();
        let span = tracing::info_span!("scrub_pass", extents = extents.len());
        async {
            for (i, info) in extents.iter().enumerate() {
                let id = &info.id;
                if i > 0 && !self.cfg.pause_between_extents.is_zero() {
                    tokio::time::sleep(self.cfg.pause_between_extents).await;
                }
                match self.store.scrub(id).await {
                    Ok(bad) => {
                        pass.extents += 1;
                        self.metrics
                            .extents_scrubbed
                            .fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .bytes_scrubbed
                            .fetch_add(info.size, Ordering::Relaxed);
                        self.metrics
                            .bad_blocks_found
                            .fetch_add(bad.len() as u64, Ordering::Relaxed);
                        for block in bad {
                            let b = BadBlock {
                                extent: id.clone(),
                                block,
                            };
                            if let Some(tx) = &self.reports {
                                // A closed receiver only means nobody repairs.
                                let _ = tx.send(b.clone()).await;
                            }
                            pass.bad.push(b);
                        }
                    }
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => {
                        tracing::error!(extent = %id, error = %e, "scrub failed");
                        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        pass.errors.push((id.clone(), e.to_string()));
                    }
                }
            }
            self.metrics.passes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                bad = pass.bad.len(),
                errors = pass.errors.len(),
                "scrub pass done"
            );
        }
        .instrument(span)
        .await;
        pass
    }

    /// Run passes until `shutdown` becomes true (or its sender is dropped).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = self.run_pass() => {}
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.pause_between_passes) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
