//! Repairing a bad block the scrubber found: fetch the block from another
//! member of the extent's current replica set and rewrite the local copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::replica::{ChunkId, Membership, MembershipError, PeerDirectory};
use crate::scrub::BadBlock;
use crate::store::{ExtentStore, RepairOutcome, StoreError, BLOCK_SIZE};

/// Why a bad block could not be repaired.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// Meta has no set for the extent (or this chunk is not in it): the
    /// local copy is stale and left for garbage collection.
    #[error("this chunk is not a member of the extent's replica set")]
    NotAMember,
    /// No other member returned a good copy of the block.
    #[error("no good copy of the block on any other member: {0}")]
    NoGoodCopy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Repair `bad` in `store` (this chunk is `local`) from another member of
/// the extent's current set, in set order.
pub async fn repair_bad_block(
    bad: &BadBlock,
    store: &ExtentStore,
    local: &ChunkId,
    membership: &dyn Membership,
    peers: &dyn PeerDirectory,
) -> Result<RepairOutcome, RepairError> {
    let set = membership
        .current(&bad.extent)
        .await?
        .ok_or(RepairError::NotAMember)?;
    if !set.contains(local) {
        return Err(RepairError::NotAMember);
    }
    let mut errors = Vec::new();
    for m in set.members.iter().filter(|m| *m != local) {
        let Some(peer) = peers.peer(m) else {
            errors.push(format!("{m}: unknown chunk"));
            continue;
        };
        match peer
            .read(&bad.extent, set.epoch, bad.block * BLOCK_SIZE, BLOCK_SIZE)
            .await
        {
            Ok(good) => return Ok(store.repair(&bad.extent, bad.block, good).await?),
            Err(e) => errors.push(format!("{m}: {e}")),
        }
    }
    Err(RepairError::NoGoodCopy(if errors.is_empty() {
        "no other member".into()
    } else {
        errors.join("; ")
    }))
}

/// Counters of scrub repairs.
#[derive(Debug, Default)]
pub struct RepairMetrics {
    pub repaired: AtomicU64,
    pub failed: AtomicU64,
}

/// Repair every [`BadBlock`] received on `rx` until the channel closes.
pub async fn run_repairs(
    mut rx: mpsc::Receiver<BadBlock>,
    store: ExtentStore,
    local: ChunkId,
    membership: Arc<dyn Membership>,
    peers: Arc<dyn PeerDirectory>,
    metrics: Arc<RepairMetrics>,
) {
    while let Some(bad) = rx.recv().await {
        let span = tracing::info_span!("scrub_repair", extent = %bad.extent, block = bad.block);
        let r = repair_bad_block(&bad, &store, &local, membership.as_ref(), peers.as_ref())
            .instrument(span.clone())
            .await;
        let _e = span.enter();
        match r {
            Ok(outcome) => {
                metrics.repaired.fetch_add(1, Ordering::Relaxed);
                tracing::info!(?outcome, "bad block repaired from a replica");
            }
            Err(e) => {
                metrics.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "bad block not repaired");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use bytes::Bytes;

    use super::*;
    use crate::identity;
    use crate::replica::{
        ExtentId, InMemoryMembership, LocalPeer, ReplicaPeer, ReplicaSet, StaticPeers,
    };
    use crate::store::StoreConfig;

    fn store(dir: &std::path::Path, chunk: &str) -> ExtentStore {
        identity::init(dir, "c", chunk, false).unwrap();
        ExtentStore::open(
            dir,
            StoreConfig {
                extent_size: 1 << 20,
                ..StoreConfig::default()
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_flipped_block_is_repaired_from_the_other_member() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (store(da.path(), "1"), store(db.path(), "2"));
        let (a, b) = (
            Arc::new(LocalPeer::new(sa.clone())),
            Arc::new(LocalPeer::new(sb.clone())),
        );
        let x = ExtentId::new("vol", 0);
        let data: Vec<u8> = (0..3 * BLOCK_SIZE as usize)
            .map(|i| (i % 251) as u8)
            .collect();
        for p in [&a, &b] {
            p.write(&x, 1, 0, Bytes::from(data.clone()), true)
                .await
                .unwrap();
        }
        // Corrupt block 1 of chunk 1 behind the store's back.
        let path = da.path().join("extents").join("vol.0000000000000000.data");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&[0xff ^ data[4100]], 4100).unwrap();
        assert_eq!(sa.scrub(&x).await.unwrap(), vec![1]);

        let m = InMemoryMembership::new(vec![], 2);
        m.set(
            x.clone(),
            ReplicaSet {
                epoch: 1,
                members: vec![a.chunk().clone(), b.chunk().clone()],
                learners: Vec::new(),
            },
        );
        let peers = StaticPeers::new().with(a.clone()).with(b.clone());
        let bad = BadBlock {
            extent: x.clone(),
            block: 1,
        };
        let out = repair_bad_block(&bad, &sa, a.chunk(), &m, &peers)
            .await
            .unwrap();
        assert_eq!(out, RepairOutcome::Repaired);
        assert!(sa.scrub(&x).await.unwrap().is_empty());
        assert_eq!(
            &sa.read(&x, 0, 3 * BLOCK_SIZE).await.unwrap()[..],
            &data[..]
        );

        // Not a member: left alone.
        m.set(
            x.clone(),
            ReplicaSet {
                epoch: 2,
                members: vec![b.chunk().clone()],
                learners: Vec::new(),
            },
        );
        let e = repair_bad_block(&bad, &sa, a.chunk(), &m, &peers)
            .await
            .unwrap_err();
        assert!(matches!(e, RepairError::NotAMember), "{e}");
        // The only member is us: nobody to fetch from.
        m.set(
            x.clone(),
            ReplicaSet {
                epoch: 3,
                members: vec![a.chunk().clone()],
                learners: Vec::new(),
            },
        );
        let e = repair_bad_block(&bad, &sa, a.chunk(), &m, &peers)
            .await
            .unwrap_err();
        assert!(matches!(e, RepairError::NoGoodCopy(_)), "{e}");
    }
}
