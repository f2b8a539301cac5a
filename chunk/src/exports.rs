//! What a chunk serves over iSCSI: every target and LUN of meta's export
//! map ([`Exporter`]), the login/discovery/masking policy over it
//! ([`ChunkPortal`]), and the self-fence every I/O passes through
//! ([`Fence`], [`FencedDevice`]).
//!
//! Every chunk serves every target, so an initiator may log in anywhere; the
//! LUNs are [`VolumeDevice`]s replicating through meta's replica sets, so
//! all chunks present the same data and the same VPD identity.
//!
//! Masking: an initiator sees a LUN only if it is in the LUN's ACL. Discovery
//! lists only targets in which the initiator sees at least one LUN, a login
//! to a target where it sees none is refused (authorization failure), REPORT
//! LUNS lists only visible LUNs and a command to an invisible LUN fails as an
//! unsupported LUN (the target crate's [`LunTable`] does the last two).
//!
//! Read-only entries: an initiator meta lists as read-only for a LUN sees
//! it write-protected ([`Portal::lun_write_protected`], asked per command,
//! so a mode change reaches established sessions with the next heartbeat
//! that carries it): MODE SENSE reports WP and writes fail with DATA
//! PROTECT / WRITE PROTECTED (the engine does that for the nexus).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ironblock_proto::v1 as pb;
use ironblock_target::login::LoginDecision;
use ironblock_target::scsi::{
    BlockDevice, DeviceError, DeviceIdentity, LogicalUnit, LuConfig, LunTable,
};
use ironblock_target::server::{DiscoveredTarget, ExportedTarget, Portal};
use parking_lot::{Mutex, RwLock};

use crate::replica::{Membership, PeerDirectory, ReplicaPeer};
use crate::volume::{VolumeConfig, VolumeDevice};

/// The self-fence: once no heartbeat has succeeded for the liveness timeout
/// (or meta said this chunk is dead), every SCSI I/O fails with NOT READY
/// until a heartbeat succeeds again. A chunk cut off from meta may already
/// have been replaced in every replica set; it must not keep acknowledging
/// writes or serving reads.
#[derive(Debug)]
pub struct Fence {
    start: Instant,
    last_ok_ms: AtomicU64,
    /// The end of the latest lease granted (ms since `start`).
    until_ms: AtomicU64,
    timeout_ms: AtomicU64,
    forced: AtomicBool,
    /// Re-registration in progress (GC and the revision not applied yet):
    /// fenced whatever the heartbeats say.
    rejoining: AtomicBool,
}

impl Fence {
    /// Open (not fenced) now; fenced after `timeout` without [`Fence::ok`].
    pub fn new(timeout: Duration) -> Self {
        Fence {
            start: Instant::now(),
            last_ok_ms: AtomicU64::new(0),
            until_ms: AtomicU64::new(timeout.as_millis() as u64),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            forced: AtomicBool::new(false),
            rejoining: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A heartbeat succeeded: open the fence.
    pub fn ok(&self) {
        self.ok_at(Instant::now());
    }

    /// A heartbeat sent at `sent` succeeded. Counting from the send time
    /// (meta saw it no earlier) makes the fence close no later than meta's
    /// liveness timeout runs out.
    pub fn ok_at(&self, sent: Instant) {
        let lease = Duration::from_millis(self.timeout_ms.load(Ordering::Acquire));
        self.ok_for(sent, lease);
    }

    /// A heartbeat sent at `sent` succeeded and meta granted a lease of
    /// `lease` (the liveness timeout, or shorter while this chunk lags a
    /// revision a call waits to see in force: meta's in-force rule). The
    /// fence stays open until the latest lease granted ends; a zero lease
    /// extends nothing.
    pub fn ok_for(&self, sent: Instant, lease: Duration) {
        let at = sent.saturating_duration_since(self.start).as_millis() as u64;
        self.last_ok_ms.fetch_max(at, Ordering::AcqRel);
        self.until_ms
            .fetch_max(at + lease.as_millis() as u64, Ordering::AcqRel);
        self.forced.store(false, Ordering::Release);
    }

    /// Fence right away (meta declared this chunk dead) until [`Fence::ok`].
    pub fn close(&self) {
        self.forced.store(true, Ordering::Release);
    }

    /// Stay fenced while re-registering, even across successful
    /// heartbeats, until [`Fence::rejoined`].
    pub fn rejoining(&self) {
        self.rejoining.store(true, Ordering::Release);
    }

    /// The re-registration finished (garbage collected, revision applied).
    pub fn rejoined(&self) {
        self.rejoining.store(false, Ordering::Release);
    }

    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Release);
    }

    /// Whether I/O is refused right now.
    pub fn is_fenced(&self) -> bool {
        self.forced.load(Ordering::Acquire)
            || self.rejoining.load(Ordering::Acquire)
            || self.now_ms() > self.until_ms.load(Ordering::Acquire)
    }

    /// Time since the last successful heartbeat.
    pub fn since_ok(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ok_ms.load(Ordering::Acquire)),
        )
    }
}

/// A [`VolumeDevice`] behind the [`Fence`].
pub struct FencedDevice {
    dev: VolumeDevice,
    fence: Arc<Fence>,
    refused: Arc<AtomicU64>,
}

impl FencedDevice {
    pub fn new(dev: VolumeDevice, fence: Arc<Fence>, refused: Arc<AtomicU64>) -> Self {
        FencedDevice {
            dev,
            fence,
            refused,
        }
    }

    fn check(&self) -> Result<(), DeviceError> {
        if self.fence.is_fenced() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(DeviceError::Unavailable(format!(
                "chunk fenced: no heartbeat accepted by meta for {:?}",
                self.fence.since_ok()
            )))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl BlockDevice for FencedDevice {
    fn block_size(&self) -> u32 {
        self.dev.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.dev.num_blocks()
    }
    fn identity(&self) -> DeviceIdentity {
        self.dev.identity()
    }
    fn thin(&self) -> bool {
        self.dev.thin()
    }
    fn write_cache(&self) -> bool {
        self.dev.write_cache()
    }
    async fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check()?;
        self.dev.read(lba, buf).await
    }
    async fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.check()?;
        self.dev.write(lba, data, fua).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.check()?;
        BlockDevice::flush(&self.dev).await
    }
    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        self.check()?;
        BlockDevice::unmap(&self.dev, lba, blocks).await
    }
    async fn lba_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        self.check()?;
        BlockDevice::lba_status(&self.dev, lba).await
    }
}

/// `s` in lower case, borrowed when it already is (IQNs nearly always are):
/// the ACL checks run on every SCSI command.
fn lowercase(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// One LUN's ACL (lowercase IQNs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct LunAcl {
    /// Every initiator allowed to see the LUN.
    all: HashSet<String>,
    /// The subset that sees it write-protected.
    read_only: HashSet<String>,
}

impl LunAcl {
    fn contains(&self, initiator: &str) -> bool {
        self.all.contains(initiator)
    }
}

/// One target's ACLs: LUN -> its ACL.
type TargetAcls = BTreeMap<u64, LunAcl>;

#[derive(Default)]
struct PortalState {
    targets: BTreeMap<String, (Arc<ExportedTarget>, TargetAcls)>,
}

/// The chunk's [`Portal`]: the export map with LUN masking by ACL.
pub struct ChunkPortal {
    state: RwLock<PortalState>,
    /// +1 on every applied export map (LUNs or ACLs may have changed):
    /// `Portal::view_version`.
    version: AtomicU64,
    /// `host:port,tpgt` handed out in SendTargets.
    address: String,
}

impl ChunkPortal {
    /// `f` of the ACL of `lun` of `target`; false when there is none.
    fn acl_says(&self, target: &str, lun: u64, f: impl FnOnce(&LunAcl) -> bool) -> bool {
        self.state
            .read()
            .targets
            .get(target)
            .and_then(|(_, acls)| acls.get(&lun))
            .is_some_and(f)
    }

    /// `advertised` is this chunk's portal (`host:port`), `tpgt` its portal
    /// group tag.
    pub fn new(advertised: &str, tpgt: u16) -> Self {
        ChunkPortal {
            state: RwLock::new(PortalState::default()),
            version: AtomicU64::new(0),
            address: format!("{advertised},{tpgt}"),
        }
    }

    fn sees_any(acls: &TargetAcls, initiator: &str) -> bool {
        let i = initiator.to_ascii_lowercase();
        acls.values().any(|a| a.contains(&i))
    }

    /// Target IQNs currently exported, sorted.
    pub fn target_names(&self) -> Vec<String> {
        self.state.read().targets.keys().cloned().collect()
    }
}

impl Portal for ChunkPortal {
    fn decide(&self, initiator: &str, target: Option<&str>) -> LoginDecision {
        let Some(t) = target else {
            return LoginDecision::Accept { chap: None };
        };
        match self.state.read().targets.get(t) {
            None => LoginDecision::NotFound,
            Some((_, acls)) if Self::sees_any(acls, initiator) => {
                LoginDecision::Accept { chap: None }
            }
            Some(_) => {
                tracing::info!(initiator, target = t, "login refused: no visible LUN");
                LoginDecision::Forbidden
            }
        }
    }

    fn discover(&self, initiator: &str, _local: SocketAddr) -> Vec<DiscoveredTarget> {
        self.state
            .read()
            .targets
            .iter()
            .filter(|(_, (_, acls))| Self::sees_any(acls, initiator))
            .map(|(name, _)| DiscoveredTarget {
                name: name.clone(),
                addresses: vec![self.address.clone()],
            })
            .collect()
    }

    fn target(&self, name: &str) -> Option<Arc<ExportedTarget>> {
        self.state.read().targets.get(name).map(|(t, _)| t.clone())
    }

    fn lun_visible(&self, initiator: &str, target: &str, lun: u64) -> bool {
        self.acl_says(target, lun, |a| a.contains(&lowercase(initiator)))
    }

    fn lun_write_protected(&self, initiator: &str, target: &str, lun: u64) -> bool {
        self.acl_says(target, lun, |a| {
            a.read_only.contains(lowercase(initiator).as_ref())
        })
    }

    fn view_version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// One exported volume.
struct Export {
    dev: VolumeDevice,
    lu: Arc<LogicalUnit>,
}

/// Builds [`VolumeDevice`]s and [`LogicalUnit`]s from meta's export map and
/// swaps them into the [`ChunkPortal`].
pub struct Exporter {
    portal: Arc<ChunkPortal>,
    membership: Arc<dyn Membership>,
    peers: Arc<dyn PeerDirectory>,
    local: Arc<dyn ReplicaPeer>,
    fence: Arc<Fence>,
    block_size: u32,
    extent_size: u64,
    peer_timeout: Duration,
    volumes: Mutex<HashMap<String, Export>>,
    /// I/O refused by the fence (all volumes).
    pub fenced_ios: Arc<AtomicU64>,
}

impl Exporter {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        portal: Arc<ChunkPortal>,
        membership: Arc<dyn Membership>,
        peers: Arc<dyn PeerDirectory>,
        local: Arc<dyn ReplicaPeer>,
        fence: Arc<Fence>,
        block_size: u32,
        extent_size: u64,
        peer_timeout: Duration,
    ) -> Self {
        Exporter {
            portal,
            membership,
            peers,
            local,
            fence,
            block_size,
            extent_size,
            peer_timeout,
            volumes: Mutex::new(HashMap::new()),
            fenced_ios: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Every exported volume device (for metrics and invalidation).
    pub fn devices(&self) -> Vec<VolumeDevice> {
        let mut v: Vec<_> = self
            .volumes
            .lock()
            .values()
            .map(|e| e.dev.clone())
            .collect();
        v.sort_by(|a, b| a.volume().cmp(b.volume()));
        v
    }

    /// Drop every device's cached replica-set views.
    pub async fn invalidate(&self) {
        for d in self.devices() {
            d.invalidate().await;
        }
    }

    fn make(&self, l: &pb::ExportedLun) -> Result<Export, String> {
        let naa: [u8; 16] = l
            .naa_id
            .as_slice()
            .try_into()
            .map_err(|_| format!("NAA id of {} bytes", l.naa_id.len()))?;
        let identity = DeviceIdentity {
            serial: l.vpd_serial.clone(),
            naa,
        };
        let mut cfg = VolumeConfig::new(l.volume_id.clone(), l.size_bytes, identity);
        cfg.logical_block_size = self.block_size;
        cfg.extent_size = self.extent_size;
        cfg.peer_timeout = self.peer_timeout;
        cfg.thin = !l.fully_provisioned;
        let dev = VolumeDevice::new(
            cfg,
            self.membership.clone(),
            self.peers.clone(),
            Some(self.local.clone()),
        )
        .map_err(|e| e.to_string())?;
        let fenced = FencedDevice::new(dev.clone(), self.fence.clone(), self.fenced_ios.clone());
        let lu = Arc::new(LogicalUnit::new(Arc::new(fenced), LuConfig::default()));
        Ok(Export { dev, lu })
    }

    /// Make the served targets, LUNs and ACLs exactly `exports`: new
    /// volumes get a device, resized ones grow (the engine raises CAPACITY
    /// DATA HAS CHANGED on the next command), removed LUNs and targets
    /// disappear (sessions to a removed target see no LUN).
    pub fn apply(&self, exports: &pb::ListExportsResponse) {
        let mut volumes = self.volumes.lock();
        let mut keep: HashSet<String> = HashSet::new();
        let mut next: BTreeMap<String, (LunTable, TargetAcls)> = BTreeMap::new();
        for t in &exports.targets {
            let mut table = LunTable::new();
            let mut acls = TargetAcls::new();
            for l in &t.luns {
                let export = match volumes.get(&l.volume_id) {
                    Some(e) => {
                        if l.size_bytes > e.dev.size_bytes() {
                            match e.dev.grow(l.size_bytes) {
                                Ok(()) => {
                                    tracing::info!(volume = %l.volume_id, size = l.size_bytes, "volume grown")
                                }
                                Err(err) => {
                                    tracing::warn!(volume = %l.volume_id, error = %err, "cannot grow volume")
                                }
                            }
                        }
                        e
                    }
                    None => match self.make(l) {
                        Ok(e) => {
                            tracing::info!(volume = %l.volume_id, name = %l.volume_name, target = %t.iqn, lun = l.lun, size = l.size_bytes, "exporting volume");
                            volumes.entry(l.volume_id.clone()).or_insert(e)
                        }
                        Err(err) => {
                            tracing::error!(volume = %l.volume_id, error = %err, "cannot export volume");
                            continue;
                        }
                    },
                };
                keep.insert(l.volume_id.clone());
                table.insert(u64::from(l.lun), export.lu.clone());
                let all: HashSet<String> = l
                    .allowed_initiators
                    .iter()
                    .map(|i| i.to_ascii_lowercase())
                    .collect();
                // Read-only only means something for an allowed initiator.
                let read_only = l
                    .read_only_initiators
                    .iter()
                    .map(|i| i.to_ascii_lowercase())
                    .filter(|i| all.contains(i))
                    .collect();
                acls.insert(u64::from(l.lun), LunAcl { all, read_only });
            }
            next.insert(t.iqn.clone(), (table, acls));
        }
        volumes.retain(|id, _| {
            let k = keep.contains(id);
            if !k {
                tracing::info!(volume = %id, "volume no longer exported");
            }
            k
        });
        drop(volumes);
        let mut st = self.portal.state.write();
        let mut targets = BTreeMap::new();
        for (iqn, (table, acls)) in next {
            let t = match st.targets.remove(&iqn) {
                Some((t, _)) => {
                    t.set_luns(table);
                    t
                }
                None => Arc::new(ExportedTarget::new(iqn.clone(), table)),
            };
            targets.insert(iqn, (t, acls));
        }
        for (iqn, (gone, _)) in std::mem::take(&mut st.targets) {
            tracing::info!(target = %iqn, "target no longer exported");
            gone.set_luns(LunTable::new());
        }
        st.targets = targets;
        self.portal.version.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_closes_after_the_timeout_and_reopens_on_ok() {
        let f = Fence::new(Duration::from_millis(50));
        assert!(!f.is_fenced());
        std::thread::sleep(Duration::from_millis(80));
        assert!(f.is_fenced());
        f.ok();
        assert!(!f.is_fenced());
        f.close();
        assert!(f.is_fenced());
        f.ok();
        assert!(!f.is_fenced());
    }

    #[test]
    fn portal_masks_by_acl() {
        let p = ChunkPortal::new("127.0.0.1:3261", 1);
        let mut acls = TargetAcls::new();
        acls.insert(
            1,
            LunAcl {
                all: ["iqn.a".to_string(), "iqn.r".to_string()]
                    .into_iter()
                    .collect(),
                read_only: ["iqn.r".to_string()].into_iter().collect(),
            },
        );
        acls.insert(2, LunAcl::default());
        p.state.write().targets.insert(
            "iqn.t1".into(),
            (
                Arc::new(ExportedTarget::new("iqn.t1", LunTable::new())),
                acls,
            ),
        );
        p.state.write().targets.insert(
            "iqn.t2".into(),
            (
                Arc::new(ExportedTarget::new("iqn.t2", LunTable::new())),
                TargetAcls::new(),
            ),
        );
        let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let d = p.discover("IQN.A", local);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, "iqn.t1");
        assert_eq!(d[0].addresses, vec!["127.0.0.1:3261,1".to_string()]);
        assert!(p.discover("iqn.b", local).is_empty());
        assert!(matches!(
            p.decide("iqn.a", Some("iqn.t1")),
            LoginDecision::Accept { .. }
        ));
        assert!(matches!(
            p.decide("iqn.b", Some("iqn.t1")),
            LoginDecision::Forbidden
        ));
        assert!(matches!(
            p.decide("iqn.a", Some("iqn.t2")),
            LoginDecision::Forbidden
        ));
        assert!(matches!(
            p.decide("iqn.a", Some("iqn.nope")),
            LoginDecision::NotFound
        ));
        assert!(matches!(
            p.decide("iqn.b", None),
            LoginDecision::Accept { .. }
        ));
        assert!(p.lun_visible("iqn.a", "iqn.t1", 1));
        // IQNs compare case-insensitively.
        assert!(p.lun_visible("IQN.A", "iqn.t1", 1));
        assert!(p.lun_write_protected("Iqn.R", "iqn.t1", 1));
        assert!(!p.lun_write_protected("IQN.A", "iqn.t1", 1));
        assert!(!p.lun_visible("iqn.a", "iqn.t1", 2));
        assert!(!p.lun_visible("iqn.b", "iqn.t1", 1));
        assert!(!p.lun_visible("iqn.a", "iqn.t2", 1));
        // A read-only entry is visible and write-protected; others are not.
        assert!(p.lun_visible("IQN.R", "iqn.t1", 1));
        assert!(p.lun_write_protected("IQN.R", "iqn.t1", 1));
        assert!(!p.lun_write_protected("iqn.a", "iqn.t1", 1));
        assert!(!p.lun_write_protected("iqn.r", "iqn.t1", 2));
        assert!(!p.lun_write_protected("iqn.r", "iqn.t2", 1));
    }
}
