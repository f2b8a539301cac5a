//! What one portal gives its clients, bounded: connections in the login
//! phase, connections in full feature phase (in all and per initiator),
//! and the data a connection may have the target buffer for its writes.
//!
//! - **Login phase** ([`LoginSlots`]): at most
//!   [`Limits::max_login_connections`] connections may be logging in at
//!   once. One more evicts the *oldest* (closed at once), so idle
//!   connections (a slow-loris) cannot keep a legitimate login out: a
//!   login takes milliseconds, an attacker has to open connections faster
//!   than that to crowd one out. The login timeout bounds each one too.
//! - **Full feature phase** ([`Sessions`]): a login that would pass
//!   [`Limits::max_connections`] in all, or
//!   [`Limits::max_connections_per_initiator`] for its initiator name, is
//!   refused with the login status *out of resources* (0x0302).
//! - **Write buffers** ([`admit_write`]): a write command whose expected
//!   data transfer length passes the largest transfer the target announces
//!   gets CHECK CONDITION (INVALID FIELD IN CDB); one that would make the
//!   connection buffer more than [`Limits::max_pending_write_bytes`] gets
//!   TASK SET FULL. Neither allocates anything.
//!
//! The decisions are pure and tested here; `server.rs` and `conn.rs` hold
//! the guards.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

/// The bounds of one server (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in the login phase at once (the oldest is evicted).
    pub max_login_connections: usize,
    /// Connections in full feature phase (sessions, discovery included).
    pub max_connections: usize,
    /// Connections in full feature phase per initiator name.
    pub max_connections_per_initiator: usize,
    /// Bytes a connection may have buffered for writes awaiting data.
    pub max_pending_write_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_login_connections: 256,
            max_connections: 1024,
            max_connections_per_initiator: 64,
            max_pending_write_bytes: 64 << 20,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connections in the login phase, oldest first.
#[derive(Debug)]
pub(crate) struct LoginSlots {
    max: usize,
    inner: Mutex<LoginQueue>,
}

#[derive(Debug, Default)]
struct LoginQueue {
    next: u64,
    open: VecDeque<(u64, CancellationToken)>,
}

/// One connection's place in the login phase; leaving it (drop) frees it.
/// `evicted` is cancelled when a newer connection needed the place.
#[derive(Debug)]
pub(crate) struct LoginSlot {
    slots: Arc<LoginSlots>,
    id: u64,
    pub(crate) evicted: CancellationToken,
}

impl LoginSlots {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(LoginSlots {
            max: max.max(1),
            inner: Mutex::default(),
        })
    }

    /// A place for a new connection; evicts (cancels) the oldest ones
    /// beyond the limit. Returns the slot and how many were evicted.
    pub(crate) fn admit(self: &Arc<Self>) -> (LoginSlot, usize) {
        let mut q = lock(&self.inner);
        let id = q.next;
        q.next += 1;
        let evicted = CancellationToken::new();
        q.open.push_back((id, evicted.clone()));
        let mut n = 0;
        while q.open.len() > self.max {
            if let Some((_, t)) = q.open.pop_front() {
                t.cancel();
                n += 1;
            }
        }
        drop(q);
        (
            LoginSlot {
                slots: self.clone(),
                id,
                evicted,
            },
            n,
        )
    }

    /// Connections in the login phase now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).open.len()
    }
}

impl Drop for LoginSlot {
    fn drop(&mut self) {
        let mut q = lock(&self.slots.inner);
        if let Some(i) = q.open.iter().position(|(id, _)| *id == self.id) {
            q.open.remove(i);
        }
    }
}

/// Why a login was refused for lack of room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// [`Limits::max_connections`] reached.
    Portal,
    /// [`Limits::max_connections_per_initiator`] reached.
    Initiator,
}

impl Full {
    /// The metric label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Full::Portal => "portal_connections",
            Full::Initiator => "initiator_connections",
        }
    }
}

/// Connections in full feature phase, in all and per initiator.
#[derive(Debug)]
pub(crate) struct Sessions {
    max: usize,
    per_initiator: usize,
    inner: Mutex<(usize, HashMap<String, usize>)>,
}

/// One connection's place in full feature phase; dropping it frees it.
#[derive(Debug)]
pub(crate) struct SessionSlot {
    sessions: Arc<Sessions>,
    initiator: String,
}

impl Sessions {
    pub(crate) fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Sessions {
            max: limits.max_connections,
            per_initiator: limits.max_connections_per_initiator,
            inner: Mutex::default(),
        })
    }

    /// A place for a connection of `initiator`, or why there is none.
    pub(crate) fn admit(self: &Arc<Self>, initiator: &str) -> Result<SessionSlot, Full> {
        let mut g = lock(&self.inner);
        let (total, per) = &mut *g;
        let mine = per.get(initiator).copied().unwrap_or(0);
        if *total >= self.max {
            return Err(Full::Portal);
        }
        if mine >= self.per_initiator {
            return Err(Full::Initiator);
        }
        *total += 1;
        per.insert(initiator.to_string(), mine + 1);
        Ok(SessionSlot {
            sessions: self.clone(),
            initiator: initiator.to_string(),
        })
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut g = lock(&self.sessions.inner);
        let (total, per) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.initiator) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.initiator);
            }
        }
    }
}

/// What to do with a write command that needs its data collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteAdmission {
    /// Buffer `edtl` bytes and collect the data.
    Buffer,
    /// More than the largest transfer the target announces: CHECK
    /// CONDITION, INVALID FIELD IN CDB.
    TooLong,
    /// The connection's write buffers would pass their bound: TASK SET
    /// FULL (the initiator retries it later).
    Full,
}

/// Decide for a write of `edtl` bytes while `pending` bytes are buffered
/// on the connection for other writes. `max_transfer`: the largest transfer
/// the target announces (VPD Block Limits).
pub(crate) fn admit_write(
    edtl: u32,
    pending: u64,
    max_transfer: u64,
    limits: &Limits,
) -> WriteAdmission {
    let edtl = u64::from(edtl);
    if edtl > max_transfer {
        WriteAdmission::TooLong
    } else if pending.saturating_add(edtl) > limits.max_pending_write_bytes {
        WriteAdmission::Full
    } else {
        WriteAdmission::Buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_login_is_evicted_beyond_the_limit() {
        let slots = LoginSlots::new(2);
        let (a, n) = slots.admit();
        assert_eq!(n, 0);
        let (b, _) = slots.admit();
        let (c, n) = slots.admit();
        assert_eq!(n, 1, "the third evicts one");
        assert!(a.evicted.is_cancelled(), "the oldest");
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(slots.len(), 2);
        // A finished login frees its place: the next one evicts nobody.
        drop(b);
        assert_eq!(slots.len(), 1);
        let (_d, n) = slots.admit();
        assert_eq!(n, 0);
        assert!(!c.evicted.is_cancelled());
        // The evicted one's drop frees nothing twice.
        drop(a);
        assert_eq!(slots.len(), 2);
    }

    #[test]
    fn sessions_are_bounded_in_all_and_per_initiator() {
        let limits = Limits {
            max_connections: 3,
            max_connections_per_initiator: 2,
            ..Limits::default()
        };
        let s = Sessions::new(&limits);
        let a1 = s.admit("a").unwrap();
        let _a2 = s.admit("a").unwrap();
        assert_eq!(s.admit("a").unwrap_err(), Full::Initiator);
        let _b1 = s.admit("b").unwrap();
        assert_eq!(s.admit("c").unwrap_err(), Full::Portal);
        // A place freed by a's first connection goes to whoever asks.
        drop(a1);
        let _c1 = s.admit("c").unwrap();
        assert_eq!(s.admit("a").unwrap_err(), Full::Portal);
        assert_eq!(Full::Portal.reason(), "portal_connections");
        assert_eq!(Full::Initiator.reason(), "initiator_connections");
    }

    #[test]
    fn a_write_buffer_is_sized_only_within_the_bounds() {
        let l = Limits {
            max_pending_write_bytes: 16 << 20,
            ..Limits::default()
        };
        let max = 8 << 20;
        assert_eq!(admit_write(8 << 20, 0, max, &l), WriteAdmission::Buffer);
        assert_eq!(
            admit_write((8 << 20) + 1, 0, max, &l),
            WriteAdmission::TooLong
        );
        assert_eq!(admit_write(u32::MAX, 0, max, &l), WriteAdmission::TooLong);
        assert_eq!(
            admit_write(8 << 20, 8 << 20, max, &l),
            WriteAdmission::Buffer
        );
        assert_eq!(admit_write(1, 16 << 20, max, &l), WriteAdmission::Full);
        assert_eq!(admit_write(4096, u64::MAX, max, &l), WriteAdmission::Full);
    }
}
