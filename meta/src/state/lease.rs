//! Virtual-IP leases for the redirectors, with fencing tokens.
//!
//! Exactly one redirector serves a VIP portal: the one holding its lease.
//! A lease is granted for a caller-chosen ttl and renewed by the holder
//! (every ttl/3 in practice). Each new tenure gets a fencing token one
//! higher than the last one granted for that VIP; a renewal keeps it.
//!
//! Expiry is in memory (monotonic `Instant`s passed in by the caller); the
//! last grant per VIP (holder, token, ttl) is committed (the sled tree
//! `vip_leases`, through the meta group's log) whenever it changes, so
//! tokens never go backwards across a meta restart or a leader change.
//! After a restart, and on a new leader, every stored lease counts as held
//! by its last holder for one ttl from then: the holder's next renewal keeps
//! it, and no other redirector can take the VIP while the old holder may
//! still believe it holds it. Plain renewals write nothing.
//!
//! A holder whose revision watch went away from its side (its process
//! died) is released early ([`State::release_vip_leases`]): a standby can
//! take the VIP at once. The freed lease still counts for the in-force
//! rule until its granted end ([`Leases::lagging`]): should the holder be
//! alive behind a broken connection, it serves until then at most, and a
//! revision waiting to be in force waits for that as before.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::info;

use super::State;
use crate::error::{MetaError, Result};

/// Shortest lease meta grants.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(100);
/// Longest lease meta grants.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(60);

/// The last grant of a VIP lease, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who was granted the lease.
    pub holder: String,
    /// Its fencing token.
    pub token: u64,
    /// The ttl it asked for, in milliseconds.
    pub ttl_ms: u64,
}

/// A lease as a caller sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    /// Granted to the caller (acquire) / held by someone (get).
    pub held: bool,
    /// The current (or last) holder; empty if never granted.
    pub holder: String,
    /// The current (or last) fencing token; 0 if never granted.
    pub token: u64,
    /// Time left on the lease (zero when not held).
    pub expires_in: Duration,
}

struct Lease {
    rec: LeaseRecord,
    expires: Instant,
    /// The metadata revision the holder last reported applied (0 after a
    /// meta restart, until its next renewal).
    applied: u64,
}

/// Every VIP lease meta knows of.
pub(crate) struct Leases {
    leases: HashMap<String, Lease>,
    /// What a grant learnt from the log (not granted here) counts from:
    /// the load, or this node's start as leader.
    since: Instant,
    /// Leases freed early, until their granted end: their holder may still
    /// serve on the view it last reported (the in-force rule counts them).
    released: Vec<Released>,
}

/// A lease freed before its granted end (see the module doc).
struct Released {
    vip: String,
    holder: String,
    until: Instant,
    applied: u64,
}

fn bad(what: &str, why: &str) -> MetaError {
    MetaError::InvalidArgument(format!("{what} {why}"))
}

impl Leases {
    /// No leases; grants loaded or applied later count from `since`.
    pub(crate) fn new(since: Instant) -> Leases {
        Leases {
            leases: HashMap::new(),
            since,
            released: Vec::new(),
        }
    }

    /// Free every lease `holder` holds at `now` (its watch went away);
    /// returns the VIPs freed. Tokens and records stay: the next grant is
    /// a new tenure, as after an expiry.
    pub(crate) fn release_holder(&mut self, holder: &str, now: Instant) -> Vec<String> {
        self.released.retain(|r| r.until > now);
        let mut freed = Vec::new();
        for (vip, l) in self.leases.iter_mut() {
            if l.rec.holder == holder && l.expires > now {
                self.released.push(Released {
                    vip: vip.clone(),
                    holder: holder.to_string(),
                    until: l.expires,
                    applied: l.applied,
                });
                l.expires = now;
                freed.push(vip.clone());
            }
        }
        freed
    }

    /// A grant as stored (loaded, or applied from the meta group's log).
    /// The same grant as the one in memory changes nothing; another one
    /// is taken as held by its holder for one ttl from `since`.
    pub(crate) fn note_record(&mut self, vip: String, rec: LeaseRecord) {
        if self.leases.get(&vip).is_some_and(|l| l.rec == rec) {
            return;
        }
        let expires = self.since + Duration::from_millis(rec.ttl_ms);
        self.leases.insert(
            vip,
            Lease {
                rec,
                expires,
                applied: 0,
            },
        );
    }

    /// Drops every grant (they are about to be loaded again).
    pub(crate) fn forget_records(&mut self) {
        self.leases.clear();
        self.released.clear();
    }

    /// This node became the leader at `now`: every recorded grant counts
    /// as held by its last holder for one ttl from now (an earlier leader
    /// may have just renewed it), so nobody else takes the VIP while the
    /// holder may still believe it holds it.
    pub(crate) fn restart(&mut self, now: Instant) {
        self.since = now;
        // Every record is held again for a whole ttl: that covers them.
        self.released.clear();
        for (vip, l) in self.leases.iter_mut() {
            l.expires = now + Duration::from_millis(l.rec.ttl_ms);
            l.applied = 0;
            info!(%vip, holder = %l.rec.holder, token = l.rec.token, "VIP lease restored; held for one ttl");
        }
    }

    fn view(&self, vip: &str, now: Instant) -> LeaseView {
        match self.leases.get(vip) {
            Some(l) => LeaseView {
                held: l.expires > now,
                holder: l.rec.holder.clone(),
                token: l.rec.token,
                expires_in: l.expires.saturating_duration_since(now),
            },
            None => LeaseView {
                held: false,
                holder: String::new(),
                token: 0,
                expires_in: Duration::ZERO,
            },
        }
    }

    /// The holders whose lease runs at `now` (or was freed early and
    /// would still run) and who have not reported applying `revision`:
    /// (holder, vip, lease end).
    pub(crate) fn lagging(&self, revision: u64, now: Instant) -> Vec<(String, String, Instant)> {
        let live = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires > now && l.applied < revision)
            .map(|(vip, l)| (l.rec.holder.clone(), vip.clone(), l.expires));
        let freed = self
            .released
            .iter()
            .filter(|r| r.until > now && r.applied < revision)
            .map(|r| (r.holder.clone(), r.vip.clone(), r.until));
        live.chain(freed).collect()
    }

    /// `cap`: the longest lease this caller may get now (the in-force
    /// rule, `state/in_force.rs`); zero refuses it.
    #[allow(clippy::too_many_arguments)]
    /// Also returns the grant to store when it changed.
    fn acquire(
        &mut self,
        vip: &str,
        holder: &str,
        ttl: Duration,
        token: u64,
        applied: u64,
        cap: Duration,
        now: Instant,
    ) -> Result<(LeaseView, Option<LeaseRecord>)> {
        if vip.is_empty() || vip.len() > 255 {
            return Err(bad("vip", "must be 1..=255 bytes (host:port)"));
        }
        if holder.is_empty() || holder.len() > 255 {
            return Err(bad("holder", "must be 1..=255 bytes"));
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) {
            return Err(bad("ttl", "must be 100..=60000 ms"));
        }
        let ttl_ms = ttl.as_millis() as u64;
        // A freed lease's holder reporting what its view applied (it is
        // alive after all): the in-force rule sees it caught up.
        for r in self.released.iter_mut().filter(|r| r.holder == holder) {
            r.applied = r.applied.max(applied);
        }
        if cap.is_zero() {
            // Behind a revision a call waits for, past the bound: no lease
            // (an existing one runs out as granted) until it has caught up.
            info!(
                vip,
                holder, applied, "VIP lease refused: the holder's view lags a revision in force"
            );
            return Ok((self.refused(vip, now), None));
        }
        let granted = ttl.min(cap);
        let last = self.leases.get(vip);
        let live = last.filter(|l| l.expires > now);
        let mut changed = None;
        let rec = match live {
            Some(l) if l.rec.holder == holder && l.rec.token == token => {
                // Renewal: same tenure, same token.
                let rec = LeaseRecord {
                    holder: holder.to_string(),
                    token,
                    ttl_ms,
                };
                if rec != l.rec {
                    changed = Some(rec.clone());
                }
                rec
            }
            // A new tenure of the current holder (it restarted) is allowed;
            // a stale token (an older instance under the same name) or
            // another holder is refused.
            Some(l) if !(l.rec.holder == holder && token == 0) => {
                return Ok((self.refused(vip, now), None))
            }
            _ => {
                let rec = LeaseRecord {
                    holder: holder.to_string(),
                    token: last.map(|l| l.rec.token).unwrap_or(0) + 1,
                    ttl_ms,
                };
                changed = Some(rec.clone());
                info!(vip, holder, token = rec.token, ?ttl, "VIP lease granted");
                rec
            }
        };
        self.leases.insert(
            vip.to_string(),
            Lease {
                rec,
                expires: now + granted,
                applied,
            },
        );
        Ok((self.granted(vip, now), changed))
    }

    fn refused(&self, vip: &str, now: Instant) -> LeaseView {
        let mut v = self.view(vip, now);
        v.held = false;
        v
    }

    fn granted(&self, vip: &str, now: Instant) -> LeaseView {
        let mut v = self.view(vip, now);
        v.held = true;
        v
    }
}

impl State {
    /// Acquire or renew the lease on `vip` for `holder` (see the module
    /// doc and `AcquireVipLease` in meta.proto). `token` is the caller's
    /// current fencing token (0: none), `applied` the metadata revision
    /// its view has applied: a holder behind a revision a call waits for
    /// gets a lease that ends within the in-force bound of that
    /// revision's commit, and none once the bound is over.
    pub fn acquire_vip_lease_applied(
        &mut self,
        vip: &str,
        holder: &str,
        ttl: Duration,
        token: u64,
        applied: u64,
        now: Instant,
    ) -> Result<LeaseView> {
        let cap = super::pulse::lock(&self.pulse)
            .in_force
            .lease(applied, ttl, now);
        let (view, changed) = self
            .leases
            .acquire(vip, holder, ttl, token, applied, cap, now)?;
        if let Some(rec) = changed {
            // Through the log (a meta group) before the holder hears of it.
            self.commit(vec![super::Op::Lease(vip.to_string(), rec)])?;
        }
        Ok(view)
    }

    /// [`State::acquire_vip_lease_applied`] for a holder whose view is
    /// current.
    pub fn acquire_vip_lease(
        &mut self,
        vip: &str,
        holder: &str,
        ttl: Duration,
        token: u64,
        now: Instant,
    ) -> Result<LeaseView> {
        let applied = self.cluster.revision;
        self.acquire_vip_lease_applied(vip, holder, ttl, token, applied, now)
    }

    /// The lease on `vip` as it is at `now`.
    pub fn vip_lease(&self, vip: &str, now: Instant) -> LeaseView {
        self.leases.view(vip, now)
    }

    /// Free the VIP leases `holder` holds at `now`: its revision watch went
    /// away from its side (see `WatchRevisionsRequest.vip_holder`). Nothing
    /// is written: the freed lease ends in memory, and the next grant is a
    /// new tenure with the next token. Returns the VIPs freed.
    pub fn release_vip_leases(&mut self, holder: &str, now: Instant) -> Vec<String> {
        let freed = self.leases.release_holder(holder, now);
        for vip in &freed {
            info!(%vip, holder, "VIP lease freed early: the holder's watch went away");
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::super::Options;
    use super::*;

    const TTL: Duration = Duration::from_secs(2);
    const VIP: &str = "127.0.0.100:3260";

    fn open(dir: &std::path::Path, now: Instant) -> State {
        let o = Options {
            seed: Some(7),
            sync: false,
            ..Options::default()
        };
        State::open(dir, o, now).unwrap()
    }

    #[test]
    fn grant_renew_refuse_expire() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut st = open(dir.path(), t0);
        assert!(!st.vip_lease(VIP, t0).held);

        let a = st.acquire_vip_lease(VIP, "a", TTL, 0, t0).unwrap();
        assert!(a.held);
        assert_eq!((a.holder.as_str(), a.token), ("a", 1));
        assert_eq!(a.expires_in, TTL);

        // Another holder is refused and told who holds it.
        let t1 = t0 + Duration::from_millis(500);
        let b = st.acquire_vip_lease(VIP, "b", TTL, 0, t1).unwrap();
        assert!(!b.held);
        assert_eq!((b.holder.as_str(), b.token), ("a", 1));
        assert_eq!(b.expires_in, Duration::from_millis(1500));

        // Renewal keeps the token and extends the lease.
        let a2 = st.acquire_vip_lease(VIP, "a", TTL, 1, t1).unwrap();
        assert!(a2.held);
        assert_eq!(a2.token, 1);
        assert_eq!(a2.expires_in, TTL);
        assert!(st.vip_lease(VIP, t1).held);

        // Expired: the next taker gets token 2; the old holder's renewal is
        // refused (stale token) and it learns who took over.
        let t2 = t1 + TTL + Duration::from_millis(1);
        assert!(!st.vip_lease(VIP, t2).held);
        let b2 = st.acquire_vip_lease(VIP, "b", TTL, 0, t2).unwrap();
        assert!(b2.held);
        assert_eq!(b2.token, 2);
        let a3 = st.acquire_vip_lease(VIP, "a", TTL, 1, t2).unwrap();
        assert!(!a3.held);
        assert_eq!((a3.holder.as_str(), a3.token), ("b", 2));

        // Leases of other VIPs are independent.
        let other = st
            .acquire_vip_lease("127.0.0.101:3260", "a", TTL, 0, t2)
            .unwrap();
        assert!(other.held);
        assert_eq!(other.token, 1);
    }

    #[test]
    fn same_holder_new_tenure_and_stale_token() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut st = open(dir.path(), t0);
        assert_eq!(st.acquire_vip_lease(VIP, "a", TTL, 0, t0).unwrap().token, 1);
        // "a" restarted: token 0 starts a new tenure while the lease runs.
        let again = st.acquire_vip_lease(VIP, "a", TTL, 0, t0).unwrap();
        assert!(again.held);
        assert_eq!(again.token, 2);
        // The old instance's token is stale now.
        let stale = st.acquire_vip_lease(VIP, "a", TTL, 1, t0).unwrap();
        assert!(!stale.held);
        assert_eq!(stale.token, 2);
    }

    #[test]
    fn bad_arguments_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut st = open(dir.path(), t0);
        for (vip, holder, ttl) in [
            ("", "a", TTL),
            (VIP, "", TTL),
            (VIP, "a", Duration::from_millis(99)),
            (VIP, "a", Duration::from_secs(61)),
        ] {
            let e = st.acquire_vip_lease(vip, holder, ttl, 0, t0).unwrap_err();
            assert!(matches!(e, MetaError::InvalidArgument(_)), "{e}");
        }
    }

    #[test]
    fn restart_keeps_tokens_and_the_holder_for_one_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        {
            let mut st = open(dir.path(), t0);
            st.acquire_vip_lease(VIP, "a", TTL, 0, t0).unwrap();
            let t1 = t0 + TTL * 2;
            assert_eq!(st.acquire_vip_lease(VIP, "b", TTL, 0, t1).unwrap().token, 2);
            st.flush().unwrap();
        }
        let t2 = t0 + TTL * 3;
        let mut st = open(dir.path(), t2);
        let v = st.vip_lease(VIP, t2);
        assert!(v.held);
        assert_eq!((v.holder.as_str(), v.token), ("b", 2));
        // Nobody else gets it during that ttl; the holder renews.
        assert!(!st.acquire_vip_lease(VIP, "a", TTL, 0, t2).unwrap().held);
        let renewed = st.acquire_vip_lease(VIP, "b", TTL, 2, t2).unwrap();
        assert!(renewed.held);
        assert_eq!(renewed.token, 2);
        // Once it runs out, the next tenure continues the token sequence.
        let t3 = t2 + TTL + Duration::from_millis(1);
        let a = st.acquire_vip_lease(VIP, "a", TTL, 0, t3).unwrap();
        assert!(a.held);
        assert_eq!(a.token, 3);
    }

    #[test]
    fn a_released_holder_frees_its_leases_at_once_but_counts_for_in_force_until_their_end() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut st = open(dir.path(), t0);
        const OTHER: &str = "127.0.0.101:3260";
        st.acquire_vip_lease_applied(VIP, "a", TTL, 0, 5, t0)
            .unwrap();
        st.acquire_vip_lease_applied(OTHER, "b", TTL, 0, 5, t0)
            .unwrap();

        let t1 = t0 + Duration::from_millis(300);
        assert_eq!(st.release_vip_leases("a", t1), vec![VIP.to_string()]);
        // Freed: a standby takes it now, with the next token; b's lease on
        // the other VIP is untouched; releasing again frees nothing.
        assert!(!st.vip_lease(VIP, t1).held);
        assert!(st.vip_lease(OTHER, t1).held);
        assert!(st.release_vip_leases("a", t1).is_empty());
        let c = st
            .acquire_vip_lease_applied(VIP, "c", TTL, 0, 5, t1)
            .unwrap();
        assert!(c.held);
        assert_eq!(c.token, 2);
        // a, if alive after all, is refused and told who holds it.
        let a = st
            .acquire_vip_lease_applied(VIP, "a", TTL, 1, 5, t1)
            .unwrap();
        assert!(!a.held);
        assert_eq!((a.holder.as_str(), a.token), ("c", 2));

        // For a revision a has not applied, a still counts until its
        // granted end (t0 + ttl), then not.
        let lag = |st: &State, at| -> Vec<String> {
            let mut h: Vec<String> = st.leases.lagging(6, at).into_iter().map(|l| l.0).collect();
            h.sort();
            h
        };
        assert_eq!(lag(&st, t1), ["a", "b", "c"]);
        let ms = Duration::from_millis(1);
        assert_eq!(lag(&st, t0 + TTL - ms), ["a", "b", "c"]);
        assert_eq!(lag(&st, t0 + TTL), ["c"]);
        // Once a reports that revision applied, it no longer counts.
        st.acquire_vip_lease_applied(VIP, "a", TTL, 1, 6, t1)
            .unwrap();
        assert_eq!(lag(&st, t1), ["b", "c"]);

        // A new leader holds every record for a ttl again: nothing freed
        // is left over.
        st.leases.restart(t1);
        assert!(st.leases.released.is_empty());
    }
}
