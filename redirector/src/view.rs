//! The redirector's view of meta (live chunks, who sees which target) and
//! the `ironblock_target` [`Portal`] built on it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ironblock_proto::v1 as pb;
use ironblock_target::login::LoginDecision;
use ironblock_target::server::{DiscoveredTarget, ExportedTarget, Portal};
use tracing::{info, warn};

use crate::hash;
use crate::metrics::Metrics;

/// A chunk logins may be redirected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveChunk {
    /// Meta's chunk id (the hash input).
    pub id: u64,
    /// The portal the chunk advertises (`host:port`).
    pub portal: String,
}

/// What the redirector knows of the cluster, rebuilt from every refresh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Alive chunks with a portal, by id.
    pub chunks: Vec<LiveChunk>,
    /// Target IQN -> initiators (lowercase) that see at least one of its
    /// LUNs -> the key their logins to that target are hashed under (see
    /// [`sharing_groups`]).
    pub targets: BTreeMap<String, BTreeMap<String, String>>,
    /// Meta's metadata revision of the export map.
    pub revision: u64,
    /// False until the first successful refresh.
    pub loaded: bool,
}

/// Where a login goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Redirect to this chunk.
    Chunk(LiveChunk),
    /// The target does not exist.
    UnknownTarget,
    /// The initiator sees no LUN of the target.
    NoVisibleLun,
    /// No chunk is alive.
    NoLiveChunk,
}

impl ClusterView {
    /// The view from `ListChunks` and `ListExports` answers: only Alive
    /// chunks (Dead, Draining and Removed ones are left out).
    pub fn from_meta(chunks: &[pb::Chunk], exports: &pb::ListExportsResponse) -> ClusterView {
        let mut live: Vec<LiveChunk> = chunks
            .iter()
            .filter(|c| c.state == pb::ChunkState::Alive as i32 && !c.portal.is_empty())
            .map(|c| LiveChunk {
                id: c.id,
                portal: c.portal.clone(),
            })
            .collect();
        live.sort_by_key(|c| c.id);
        let targets = exports
            .targets
            .iter()
            .map(|t| {
                let acls: Vec<&[String]> = t
                    .luns
                    .iter()
                    .map(|l| l.allowed_initiators.as_slice())
                    .collect();
                (t.iqn.clone(), sharing_groups(&acls))
            })
            .collect();
        ClusterView {
            chunks: live,
            targets,
            revision: exports.revision,
            loaded: true,
        }
    }

    /// Where a normal-session login of `initiator` to `target` goes, over
    /// every live chunk.
    pub fn route(&self, initiator: &str, target: &str) -> Route {
        self.route_excluding(initiator, target, &BTreeSet::new())
    }

    /// [`ClusterView::route`] leaving out the chunks in `unreachable` (the
    /// redirector's failed portal probes) unless that leaves none, in which
    /// case meta's view alone decides.
    pub fn route_excluding(
        &self,
        initiator: &str,
        target: &str,
        unreachable: &BTreeSet<u64>,
    ) -> Route {
        let Some(who) = self.targets.get(target) else {
            return Route::UnknownTarget;
        };
        let Some(key) = who.get(&initiator.to_ascii_lowercase()) else {
            return Route::NoVisibleLun;
        };
        let reachable = self
            .chunks
            .iter()
            .map(|c| c.id)
            .filter(|c| !unreachable.contains(c));
        let id = match hash::choose(key, target, reachable) {
            Some(id) => id,
            None => match hash::choose(key, target, self.chunks.iter().map(|c| c.id)) {
                Some(id) => id,
                None => return Route::NoLiveChunk,
            },
        };
        match self.chunks.iter().find(|c| c.id == id) {
            Some(c) => Route::Chunk(c.clone()),
            None => Route::NoLiveChunk,
        }
    }

    /// Targets `initiator` sees at least one LUN of, sorted.
    pub fn visible_targets(&self, initiator: &str) -> Vec<String> {
        let i = initiator.to_ascii_lowercase();
        self.targets
            .iter()
            .filter(|(_, who)| who.contains_key(&i))
            .map(|(t, _)| t.clone())
            .collect()
    }
}

/// The sharing groups of one target: every initiator (lowercased) that is
/// on the ACL of at least one of its LUNs, mapped to its group's hash key.
///
/// Rule: two initiators are in the same group when they are both on the
/// ACL of one LUN of the target; groups are closed transitively (the
/// connected components of "shares a LUN"). A group's key is its smallest
/// lowercased IQN (byte order). Logins are hashed with (key, target), so
/// every initiator that shares a LUN is sent to the same chunk: persistent
/// reservations, RESERVE/RELEASE and unit attentions live in the serving
/// chunk's logical unit, and two nexuses of one LUN must meet there. An
/// initiator alone on its LUNs is its own key, so the usual one-initiator
/// ACL hashes exactly as (initiator, target).
pub fn sharing_groups(acls: &[&[String]]) -> BTreeMap<String, String> {
    // Union-find over the lowercased names, the root always the smallest.
    let mut parent: BTreeMap<String, String> = BTreeMap::new();
    fn find(parent: &mut BTreeMap<String, String>, x: &str) -> String {
        let mut root = x.to_string();
        while let Some(p) = parent.get(&root) {
            if *p == root {
                break;
            }
            root = p.clone();
        }
        // Path compression.
        let mut cur = x.to_string();
        while let Some(p) = parent.get(&cur).cloned() {
            if p == cur {
                break;
            }
            parent.insert(cur, root.clone());
            cur = p;
        }
        root
    }
    for acl in acls {
        let names: Vec<String> = acl.iter().map(|i| i.to_ascii_lowercase()).collect();
        for n in &names {
            parent.entry(n.clone()).or_insert_with(|| n.clone());
        }
        for pair in names.windows(2) {
            let a = find(&mut parent, &pair[0]);
            let b = find(&mut parent, &pair[1]);
            if a != b {
                let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                parent.insert(hi, lo);
            }
        }
    }
    let names: Vec<String> = parent.keys().cloned().collect();
    names
        .into_iter()
        .map(|n| {
            let root = find(&mut parent, &n);
            (n, root)
        })
        .collect()
}

/// The redirector's [`Portal`]: discovery answers with the VIP, normal
/// logins are redirected, no session ever reaches full feature phase on a
/// target here ([`Portal::target`] is always `None`).
pub struct RedirectPortal {
    view: RwLock<Arc<ClusterView>>,
    /// Chunks whose portal failed the last probe.
    unreachable: RwLock<BTreeSet<u64>>,
    /// `host:port,1` handed out in SendTargets.
    vip_address: String,
    /// Connect to the chosen chunk's portal before answering a login
    /// (bounded by this); `None`: trust the last probe round.
    verify: Option<Duration>,
    metrics: Arc<Metrics>,
}

impl RedirectPortal {
    /// `vip` is the advertised VIP portal `host:port`.
    pub fn new(vip: &str, metrics: Arc<Metrics>) -> RedirectPortal {
        RedirectPortal {
            view: RwLock::new(Arc::new(ClusterView::default())),
            unreachable: RwLock::new(BTreeSet::new()),
            vip_address: format!("{vip},1"),
            verify: None,
            metrics,
        }
    }

    /// Check the chosen chunk's target with a [`crate::probe`] (at most
    /// `timeout`) right before every redirect; a chunk that refuses is
    /// marked unreachable and the login re-routed. Closes the window
    /// between a chunk's death and the next probe round, in which a
    /// reconnecting initiator would be sent straight back to the dead
    /// chunk.
    pub fn with_login_check(mut self, timeout: Duration) -> RedirectPortal {
        self.verify = Some(timeout);
        self
    }

    /// Whether the target on `portal` answers a probe within the login check's
    /// timeout. Runs on a multi-threaded tokio runtime only (the probe
    /// blocks the thread, so tokio is told with `block_in_place`); anywhere
    /// else, or for a portal that is not an IP address, it answers true.
    fn portal_accepts(&self, portal: &str) -> bool {
        let Some(timeout) = self.verify else {
            return true;
        };
        let Ok(addr) = portal.parse::<SocketAddr>() else {
            return true;
        };
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if !multi {
            return true;
        }
        tokio::task::block_in_place(|| crate::probe::probe_blocking(&addr, timeout))
    }

    /// The current view.
    pub fn view(&self) -> Arc<ClusterView> {
        match self.view.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Chunks whose portal failed the last probe.
    pub fn unreachable(&self) -> BTreeSet<u64> {
        match self.unreachable.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Record the result of a probe round: the chunks whose portal did not
    /// answer the probe (logs changes).
    pub fn set_unreachable(&self, ids: BTreeSet<u64>) {
        let old = self.unreachable();
        if old != ids {
            info!(unreachable = ?ids, "chunk portal probes changed");
        }
        self.metrics
            .unreachable_chunks
            .store(ids.len() as u64, Ordering::Relaxed);
        match self.unreachable.write() {
            Ok(mut g) => *g = ids,
            Err(p) => *p.into_inner() = ids,
        }
    }

    /// Add one chunk to the unreachable set (until the next probe round).
    fn mark_unreachable(&self, id: u64) {
        let mut set = self.unreachable();
        if set.insert(id) {
            self.set_unreachable(set);
        }
    }

    /// Replace the view (logs chunk set changes).
    pub fn set_view(&self, view: ClusterView) {
        let old = self.view();
        if old.chunks != view.chunks {
            let ids: Vec<u64> = view.chunks.iter().map(|c| c.id).collect();
            info!(chunks = ?ids, revision = view.revision, "live chunks changed");
        }
        self.metrics
            .live_chunks
            .store(view.chunks.len() as u64, Ordering::Relaxed);
        let view = Arc::new(view);
        match self.view.write() {
            Ok(mut g) => *g = view,
            Err(p) => *p.into_inner() = view,
        }
    }
}

impl Portal for RedirectPortal {
    fn decide(&self, initiator: &str, target: Option<&str>) -> LoginDecision {
        let Some(target) = target else {
            return LoginDecision::Accept { chap: None };
        };
        let refused = |why: &str, d: LoginDecision| {
            self.metrics.logins_refused.fetch_add(1, Ordering::Relaxed);
            info!(initiator, target, why, "login refused");
            d
        };
        let mut unreachable = self.unreachable();
        let view = self.view();
        let mut route = view.route_excluding(initiator, target, &unreachable);
        // At most one re-route per live chunk.
        for _ in 0..view.chunks.len() {
            let Route::Chunk(c) = &route else { break };
            if unreachable.contains(&c.id) || self.portal_accepts(&c.portal) {
                break;
            }
            warn!(chunk = c.id, portal = %c.portal, "chosen chunk refused the login check; re-routing");
            unreachable.insert(c.id);
            self.mark_unreachable(c.id);
            route = view.route_excluding(initiator, target, &unreachable);
        }
        match route {
            Route::Chunk(c) => {
                self.metrics.redirected(c.id);
                info!(initiator, target, chunk = c.id, portal = %c.portal, "login redirected");
                LoginDecision::Redirect {
                    address: c.portal,
                    permanent: false,
                }
            }
            Route::UnknownTarget => refused("unknown target", LoginDecision::NotFound),
            Route::NoVisibleLun => refused("no visible LUN", LoginDecision::Forbidden),
            Route::NoLiveChunk => {
                // The login seam has no "service unavailable" answer; a
                // not-found makes the initiator retry discovery later.
                warn!(initiator, target, "no live chunk to redirect to");
                refused("no live chunk", LoginDecision::NotFound)
            }
        }
    }

    fn discover(&self, initiator: &str, _local: SocketAddr) -> Vec<DiscoveredTarget> {
        self.metrics.discoveries.fetch_add(1, Ordering::Relaxed);
        self.view()
            .visible_targets(initiator)
            .into_iter()
            .map(|name| DiscoveredTarget {
                name,
                addresses: vec![self.vip_address.clone()],
            })
            .collect()
    }

    fn target(&self, _name: &str) -> Option<Arc<ExportedTarget>> {
        None
    }

    fn lun_visible(&self, _initiator: &str, _target: &str, _lun: u64) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "iqn.2026-11.dev.ironblock:t1";
    const T2: &str = "iqn.2026-11.dev.ironblock:t2";
    const ALICE: &str = "iqn.2026-11.dev.test:alice";

    fn chunk(id: u64, state: pb::ChunkState) -> pb::Chunk {
        pb::Chunk {
            id,
            portal: format!("127.0.0.1:{}", 3260 + id),
            state: state as i32,
            ..Default::default()
        }
    }

    fn exports() -> pb::ListExportsResponse {
        let lun = |acl: &[&str]| pb::ExportedLun {
            lun: 1,
            allowed_initiators: acl.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        pb::ListExportsResponse {
            targets: vec![
                pb::ExportedTarget {
                    iqn: T1.into(),
                    luns: vec![lun(&[]), lun(&[ALICE])],
                },
                pb::ExportedTarget {
                    iqn: T2.into(),
                    luns: vec![lun(&["iqn.2026-11.dev.test:bob"])],
                },
            ],
            revision: 9,
        }
    }

    fn portal() -> (RedirectPortal, Arc<Metrics>) {
        let m = Arc::new(Metrics::default());
        let p = RedirectPortal::new("127.0.0.100:3260", m.clone());
        p.set_view(ClusterView::from_meta(
            &[
                chunk(1, pb::ChunkState::Alive),
                chunk(2, pb::ChunkState::Dead),
                chunk(3, pb::ChunkState::Alive),
                chunk(4, pb::ChunkState::Draining),
            ],
            &exports(),
        ));
        (p, m)
    }

    #[test]
    fn initiators_sharing_a_lun_hash_under_the_smallest_iqn() {
        let v = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let l1 = v(&["iqn.b", "IQN.C"]);
        let l2 = v(&["iqn.c", "iqn.d"]);
        let l3 = v(&["iqn.z"]);
        let l4 = v(&[]);
        let g = sharing_groups(&[&l1, &l2, &l3, &l4]);
        // b-c share l1, c-d share l2: one group {b, c, d} keyed "iqn.b".
        for n in ["iqn.b", "iqn.c", "iqn.d"] {
            assert_eq!(g.get(n).map(String::as_str), Some("iqn.b"), "{g:?}");
        }
        assert_eq!(g.get("iqn.z").map(String::as_str), Some("iqn.z"));
        assert_eq!(g.len(), 4);
        // Order of the ACLs does not matter.
        assert_eq!(sharing_groups(&[&l3, &l2, &l1]), g);

        // Both initiators of a shared LUN are sent to the same chunk.
        let view = ClusterView::from_meta(
            &[
                chunk(1, pb::ChunkState::Alive),
                chunk(2, pb::ChunkState::Alive),
                chunk(3, pb::ChunkState::Alive),
            ],
            &pb::ListExportsResponse {
                targets: vec![pb::ExportedTarget {
                    iqn: T1.into(),
                    luns: vec![pb::ExportedLun {
                        lun: 1,
                        allowed_initiators: v(&["iqn.y:two", "iqn.x:one"]),
                        ..Default::default()
                    }],
                }],
                revision: 1,
            },
        );
        let want = hash::choose("iqn.x:one", T1, [1, 2, 3]).unwrap();
        for i in ["iqn.x:one", "iqn.y:two"] {
            assert_eq!(
                view.route(i, T1),
                Route::Chunk(view.chunks[(want - 1) as usize].clone())
            );
        }
    }

    #[test]
    fn unreachable_chunks_are_left_out_unless_none_is_left() {
        let (p, _) = portal();
        let want = hash::choose(ALICE, T1, [1, 3]).unwrap();
        let other = if want == 1 { 3 } else { 1 };
        p.set_unreachable([want].into());
        assert_eq!(
            p.decide(ALICE, Some(T1)),
            LoginDecision::Redirect {
                address: format!("127.0.0.1:{}", 3260 + other),
                permanent: false
            }
        );
        // Every live chunk failing its probe: meta's view decides.
        p.set_unreachable([1, 3].into());
        assert_eq!(
            p.decide(ALICE, Some(T1)),
            LoginDecision::Redirect {
                address: format!("127.0.0.1:{}", 3260 + want),
                permanent: false
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_login_check_reroutes_away_from_a_refusing_chunk() {
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap().to_string();
        // The live chunk's target answers the probe with a Login Response.
        crate::probe::tests::answer_probes(live.try_clone().unwrap());
        let dead_addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let want = hash::choose(ALICE, T1, [1, 2]).unwrap();
        let other = 3 - want;
        // The hashed chunk refuses connections, the other accepts.
        let portal_of = |id: u64| {
            if id == want {
                dead_addr.clone()
            } else {
                live_addr.clone()
            }
        };
        let chunks: Vec<pb::Chunk> = [1, 2]
            .iter()
            .map(|id| pb::Chunk {
                id: *id,
                portal: portal_of(*id),
                state: pb::ChunkState::Alive as i32,
                ..Default::default()
            })
            .collect();
        let m = Arc::new(Metrics::default());
        let p = RedirectPortal::new("127.0.0.100:3260", m.clone())
            .with_login_check(Duration::from_millis(200));
        p.set_view(ClusterView::from_meta(&chunks, &exports()));
        assert_eq!(
            p.decide(ALICE, Some(T1)),
            LoginDecision::Redirect {
                address: portal_of(other),
                permanent: false
            }
        );
        assert_eq!(m.redirects_to(want), 0);
        assert_eq!(p.unreachable(), [want].into());
        // Without the check the last probe round decides (nothing known
        // to be unreachable: the hashed chunk).
        let p = RedirectPortal::new("127.0.0.100:3260", m);
        p.set_view(ClusterView::from_meta(&chunks, &exports()));
        assert_eq!(
            p.decide(ALICE, Some(T1)),
            LoginDecision::Redirect {
                address: portal_of(want),
                permanent: false
            }
        );
        drop(live);
    }

    #[test]
    fn only_alive_chunks_are_in_the_view() {
        let (p, m) = portal();
        let ids: Vec<u64> = p.view().chunks.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(m.live_chunks.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn discovery_lists_visible_targets_with_the_vip() {
        let (p, m) = portal();
        let local: SocketAddr = "127.0.0.100:3260".parse().unwrap();
        let d = p.discover("IQN.2026-11.dev.test:Alice", local);
        assert_eq!(
            d,
            vec![DiscoveredTarget {
                name: T1.into(),
                addresses: vec!["127.0.0.100:3260,1".into()],
            }]
        );
        assert!(p.discover("iqn.2026-11.dev.test:nobody", local).is_empty());
        assert_eq!(m.discoveries.load(Ordering::Relaxed), 2);
        assert_eq!(p.decide(ALICE, None), LoginDecision::Accept { chap: None });
    }

    #[test]
    fn logins_are_redirected_by_the_hash_or_refused() {
        let (p, m) = portal();
        let want = hash::choose(ALICE, T1, [1, 3]).unwrap();
        assert_eq!(
            p.decide(ALICE, Some(T1)),
            LoginDecision::Redirect {
                address: format!("127.0.0.1:{}", 3260 + want),
                permanent: false
            }
        );
        assert_eq!(m.redirects_to(want), 1);
        assert_eq!(p.decide(ALICE, Some(T2)), LoginDecision::Forbidden);
        assert_eq!(p.decide(ALICE, Some("iqn.x:none")), LoginDecision::NotFound);
        assert!(p.target(T1).is_none());
        // No live chunk: refused, never redirected to a dead one.
        p.set_view(ClusterView::from_meta(
            &[chunk(1, pb::ChunkState::Dead)],
            &exports(),
        ));
        assert_eq!(p.decide(ALICE, Some(T1)), LoginDecision::NotFound);
        assert_eq!(m.logins_refused.load(Ordering::Relaxed), 3);
    }
}
