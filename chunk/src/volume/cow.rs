//! Copy-on-write on the write path: getting the volume its own writable
//! extent before the first write to an extent index.
//!
//! - Meta resolves an own extent: use it.
//! - Nothing resolved (never written, thin volume or clone): meta places a
//!   fresh extent ([`Membership::ensure_extent`](crate::replica::Membership::ensure_extent)).
//! - Data resolved elsewhere (an older generation after a snapshot, or a
//!   clone's parent): [`Membership::copy_up`](crate::replica::Membership::copy_up) returns the source and a
//!   PENDING destination on the source's chunks; every destination member
//!   copies the source locally ([`ReplicaPeer::copy_extent`](crate::replica::ReplicaPeer::copy_extent)), members that
//!   cannot are removed from the destination's set (never all of them), and
//!   [`Membership::commit_copy_up`](crate::replica::Membership::commit_copy_up) makes it the volume's extent. A crash
//!   anywhere in between loses nothing: reads keep resolving to the source
//!   and the next writer resumes the same pending copy-up.
//!
//! Copy-ups of one extent are serialized by the slot's copy lock; a writer
//! that waited finds the view cached and writes at once.

use futures::future::join_all;

use super::{bump, classify, CachedView, Inner, Slot, VolumeError};
use crate::replica::{ChunkId, CopyUp, ExtentView, MembershipError, PeerError};

impl Inner {
    /// The volume's own writable extent at `index`: cached, resolved, placed
    /// or copied up (see the module docs).
    pub(super) async fn acquire_own(
        &self,
        index: u64,
        slot: &Slot,
    ) -> Result<ExtentView, VolumeError> {
        let _serial = slot.copy.lock().await;
        if let Some(own) = slot.view.lock().as_ref().and_then(|c| c.own.clone()) {
            return Ok(own);
        }
        let volume = self.cfg.volume.as_str();
        let r = self.fetch(index, slot).await?;
        if let Some(own) = r.own {
            return Ok(own);
        }
        if r.read.is_none() {
            match self.membership.ensure_extent(volume, index).await {
                Ok(_) => {
                    if let Some(own) = self.fetch(index, slot).await?.own {
                        return Ok(own);
                    }
                    return Err(VolumeError::Unavailable {
                        extent: self.extent(index),
                        reason: "meta placed the extent but does not resolve it".into(),
                    });
                }
                // Written (and snapshotted) meanwhile by someone else.
                Err(MembershipError::CopyUpRequired(why)) => {
                    tracing::info!(index, %why, "extent needs a copy-up after all");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let cu = self.membership.copy_up(volume, index).await?;
        self.finish_copy_up(index, slot, cu).await
    }

    /// Have every destination member copy the source, then commit.
    async fn finish_copy_up(
        &self,
        index: u64,
        slot: &Slot,
        cu: CopyUp,
    ) -> Result<ExtentView, VolumeError> {
        let dst = cu.destination;
        if !dst.pending {
            self.cache_own(slot, dst.clone());
            return Ok(dst);
        }
        let Some(src) = cu.source else {
            return Err(VolumeError::Internal(format!(
                "meta returned pending copy-up {} without a source",
                dst.id
            )));
        };
        bump(&self.metrics.copy_ups);
        tracing::info!(parent: &self.span, from = %src.id, to = %dst.id, members = ?dst.set.members, "copy-up");
        let calls = dst.set.members.iter().map(|m| {
            let (src, dst) = (&src, &dst);
            async move {
                // Only a member holding the source copies locally; another
                // would copy zeros.
                let r = if !src.set.contains(m) {
                    Err(PeerError::Other(format!(
                        "chunk {m} does not hold {}",
                        src.id
                    )))
                } else {
                    match self.peer(m) {
                        None => Err(PeerError::Unreachable("unknown chunk".into())),
                        Some(p) => {
                            self.call(&*p, p.copy_extent(&src.id, &dst.id, dst.set.epoch))
                                .await
                        }
                    }
                };
                (m.clone(), r)
            }
        });
        let results = join_all(calls).await;
        let mut copied = 0usize;
        let mut failed: Vec<(ChunkId, PeerError)> = Vec::new();
        let mut stale = false;
        for (m, r) in results {
            match r {
                Ok(()) => copied += 1,
                Err(PeerError::StaleEpoch { have, got }) => {
                    tracing::info!(chunk = %m, have, got, extent = %dst.id, "copy-up destination is newer: committed meanwhile");
                    stale = true;
                }
                Err(e) => failed.push((m, e)),
            }
        }
        if stale {
            // Another access point committed and wrote: use its extent.
            if let Some(own) = self.fetch(index, slot).await?.own {
                return Ok(own);
            }
            return Err(VolumeError::Unavailable {
                extent: dst.id,
                reason: "copy-up destination moved on but meta does not resolve it".into(),
            });
        }
        if copied == 0 {
            return Err(classify(dst.id, &failed));
        }
        let mut epoch = dst.set.epoch;
        for (m, e) in failed {
            tracing::warn!(chunk = %m, extent = %dst.id, error = %e, "copy-up failed on a member; removing it");
            let set = self.membership.remove_member(&dst.id, &m, epoch).await?;
            epoch = set.epoch;
            if !set.contains(&m) {
                bump(&self.metrics.member_removals);
            }
        }
        let own = self
            .membership
            .commit_copy_up(&self.cfg.volume, index, &dst.id)
            .await?;
        tracing::info!(parent: &self.span, from = %src.id, extent = %own.id, epoch = own.set.epoch, members = ?own.set.members, "copy-up committed");
        self.cache_own(slot, own.clone());
        Ok(own)
    }

    /// The volume now reads and writes `own` at this index.
    fn cache_own(&self, slot: &Slot, own: ExtentView) {
        *slot.view.lock() = Some(CachedView {
            read: Some(own.clone()),
            own: Some(own),
        });
    }
}
