//! Node logic against a fake [`Initiator`]: format safety, identity checks,
//! ABORTED on a busy volume, shared-target logout safety, coalesced logins,
//! idempotency.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ironblock_proto::csi;
use ironblock_proto::csi::node_server::Node;
use ironblock_proto::csi::volume_capability::access_mode::Mode;
use ironblock_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::{Code, Request};

use super::*;

const TARGET: &str = "iqn.2026-11.dev.ironblock:t0";
const PORTAL: &str = "127.0.0.100:3260";

#[derive(Clone, Debug)]
struct Disk {
    serial: String,
    wwn: Option<String>,
    signature: Option<String>,
    size: u64,
    /// Proves it was never written (a fresh thin LUN).
    fresh: bool,
}

#[derive(Default)]
struct FakeState {
    /// What the targets export: (target, lun) -> device path.
    catalog: HashMap<(String, u32), PathBuf>,
    /// Disk contents by device path.
    disks: HashMap<PathBuf, Disk>,
    /// Devices visible now.
    attached: HashSet<PathBuf>,
    sessions: HashSet<String>,
    mounts: HashMap<PathBuf, MountInfo>,
    formats: Vec<PathBuf>,
    /// Formats told the device reads as zeros.
    prezeroed: Vec<PathBuf>,
    signature_probes: usize,
    removed: Vec<PathBuf>,
    logouts: Vec<String>,
    fail_format: bool,
}

#[derive(Default)]
struct Fake {
    s: Mutex<FakeState>,
    login_delay: Mutex<Duration>,
    logins: AtomicUsize,
    logins_now: AtomicUsize,
    logins_peak: AtomicUsize,
    /// The next this many logins fail as unreachable (a portal that has
    /// not caught up yet).
    fail_logins: AtomicUsize,
    format_delay: Mutex<Duration>,
    formats_now: AtomicUsize,
    formats_peak: AtomicUsize,
}

impl Fake {
    fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.s.lock().unwrap()
    }

    /// Exports `volume_id` as `lun` of `target` on device `dev`.
    fn export(&self, target: &str, lun: u32, dev: &str, volume_id: &str, signature: Option<&str>) {
        let mut s = self.st();
        s.catalog
            .insert((target.to_string(), lun), PathBuf::from(dev));
        s.disks.insert(
            PathBuf::from(dev),
            Disk {
                serial: names::serial_of(volume_id),
                wwn: None,
                signature: signature.map(str::to_string),
                size: 1 << 30,
                fresh: false,
            },
        );
    }

    /// The WWN device `dev` reports.
    fn set_wwn(&self, dev: &str, wwn: &str) {
        let mut s = self.st();
        let d = s.disks.get_mut(Path::new(dev)).expect("an exported device");
        d.wwn = Some(wwn.to_string());
    }

    /// Exports `n` blank volumes as LUNs 1..=n of [`TARGET`]; their ids.
    fn export_many(&self, n: u8) -> Vec<String> {
        let ids: Vec<String> = (1..=n).map(vol).collect();
        for (i, id) in ids.iter().enumerate() {
            self.export(TARGET, i as u32 + 1, &format!("/dev/sd{i}"), id, None);
        }
        ids
    }

    fn attach_target(s: &mut FakeState, target: &str) {
        let devs: Vec<PathBuf> = s
            .catalog
            .iter()
            .filter(|((t, _), _)| t == target)
            .map(|(_, d)| d.clone())
            .collect();
        s.attached.extend(devs);
    }
}

fn failed(cmd: &str) -> InitiatorError {
    InitiatorError::Failed {
        cmd: cmd.into(),
        msg: "fake".into(),
    }
}

#[async_trait::async_trait]
impl Initiator for Fake {
    async fn login(
        &self,
        _portal: &str,
        target: &str,
        _chap: Option<&Chap>,
    ) -> std::result::Result<(), InitiatorError> {
        self.logins.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .fail_logins
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(InitiatorError::Unreachable(
                "iscsiadm: No portals found".into(),
            ));
        }
        let now = self.logins_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.logins_peak.fetch_max(now, Ordering::SeqCst);
        let d = *self.login_delay.lock().unwrap();
        tokio::time::sleep(d).await;
        self.logins_now.fetch_sub(1, Ordering::SeqCst);
        let mut s = self.st();
        s.sessions.insert(target.to_string());
        Fake::attach_target(&mut s, target);
        Ok(())
    }
    async fn logout(&self, _portal: &str, target: &str) -> std::result::Result<(), InitiatorError> {
        let mut s = self.st();
        s.sessions.remove(target);
        s.logouts.push(target.to_string());
        let gone: Vec<PathBuf> = s
            .catalog
            .iter()
            .filter(|((t, _), _)| t == target)
            .map(|(_, d)| d.clone())
            .collect();
        for d in gone {
            s.attached.remove(&d);
        }
        Ok(())
    }
    async fn rescan(&self, target: &str) -> std::result::Result<(), InitiatorError> {
        let mut s = self.st();
        if s.sessions.contains(target) {
            Fake::attach_target(&mut s, target);
        }
        Ok(())
    }
    async fn find_device(
        &self,
        _p: &str,
        target: &str,
        lun: u32,
    ) -> std::result::Result<Option<PathBuf>, InitiatorError> {
        let s = self.st();
        Ok(s.catalog
            .get(&(target.to_string(), lun))
            .filter(|d| s.attached.contains(*d) && s.sessions.contains(target))
            .cloned())
    }
    async fn device_exists(&self, device: &Path) -> bool {
        self.st().attached.contains(device)
    }
    async fn identity(&self, device: &Path) -> std::result::Result<DeviceIdentity, InitiatorError> {
        let s = self.st();
        let d = s.disks.get(device).ok_or_else(|| failed("identity"))?;
        Ok(DeviceIdentity {
            serial: Some(d.serial.clone()),
            wwn: d.wwn.clone(),
        })
    }
    async fn never_written(&self, device: &Path) -> bool {
        self.st().disks.get(device).is_some_and(|d| d.fresh)
    }
    async fn signature(
        &self,
        device: &Path,
    ) -> std::result::Result<Option<String>, InitiatorError> {
        self.st().signature_probes += 1;
        Ok(self
            .st()
            .disks
            .get(device)
            .and_then(|d| d.signature.clone()))
    }
    async fn format(
        &self,
        device: &Path,
        fs_type: &str,
        prezeroed: bool,
    ) -> std::result::Result<(), InitiatorError> {
        let now = self.formats_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.formats_peak.fetch_max(now, Ordering::SeqCst);
        let d = *self.format_delay.lock().unwrap();
        tokio::time::sleep(d).await;
        self.formats_now.fetch_sub(1, Ordering::SeqCst);
        let mut s = self.st();
        s.formats.push(device.to_path_buf());
        if prezeroed {
            s.prezeroed.push(device.to_path_buf());
        }
        if s.fail_format {
            return Err(failed("mkfs"));
        }
        let d = s.disks.get_mut(device).ok_or_else(|| failed("mkfs"))?;
        assert!(d.signature.is_none(), "formatted a device with a signature");
        d.signature = Some(fs_type.to_string());
        d.fresh = false;
        Ok(())
    }
    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: Option<&str>,
        options: &[String],
    ) -> std::result::Result<(), InitiatorError> {
        let mut s = self.st();
        // A bind of a staging dir shows the staging mount's device.
        let src = s
            .mounts
            .get(source)
            .map(|m| m.source.clone())
            .unwrap_or_else(|| source.to_string_lossy().into_owned());
        s.mounts.insert(
            target.to_path_buf(),
            MountInfo {
                source: src,
                fs_type: fs_type.unwrap_or("bind").to_string(),
                readonly: options.iter().any(|o| o == "ro"),
            },
        );
        Ok(())
    }
    async fn unmount(&self, target: &Path) -> std::result::Result<(), InitiatorError> {
        self.st().mounts.remove(target);
        Ok(())
    }
    async fn mount_at(
        &self,
        path: &Path,
    ) -> std::result::Result<Option<MountInfo>, InitiatorError> {
        Ok(self.st().mounts.get(path).cloned())
    }
    async fn remove_device(&self, device: &Path) -> std::result::Result<(), InitiatorError> {
        let mut s = self.st();
        s.attached.remove(device);
        s.removed.push(device.to_path_buf());
        Ok(())
    }
    async fn device_size(&self, device: &Path) -> std::result::Result<u64, InitiatorError> {
        self.st()
            .disks
            .get(device)
            .map(|d| d.size)
            .ok_or_else(|| failed("size"))
    }
    async fn resize_fs(
        &self,
        _d: &Path,
        _m: &Path,
        _f: &str,
    ) -> std::result::Result<(), InitiatorError> {
        Ok(())
    }
    async fn fs_stats(&self, _p: &Path) -> std::result::Result<FsStats, InitiatorError> {
        Ok(FsStats {
            total_bytes: 1 << 30,
            available_bytes: 1 << 29,
            used_bytes: 1 << 29,
            total_inodes: 1000,
            free_inodes: 900,
        })
    }
}

struct Rig {
    fake: Arc<Fake>,
    node: Arc<NodeService>,
    dir: tempfile::TempDir,
}

fn rig() -> Rig {
    rig_with(|_| {})
}

fn rig_with(f: impl FnOnce(&mut NodeConfig)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let mut cfg = NodeConfig::new(
        "iqn.2026-11.dev.ironblock.node:n1",
        &dir.path().join("state"),
    );
    cfg.device_timeout = Duration::from_millis(600);
    f(&mut cfg);
    let node = Arc::new(NodeService::new(cfg, fake.clone()).unwrap());
    Rig { fake, node, dir }
}

/// The WWN of an ironblock LUN of volume `id`: NAA-6, the company id, the
/// volume id's leading bits.
fn ironblock_wwn(id: &str) -> String {
    let bits = u128::from_str_radix(&names::serial_of(id), 16).unwrap();
    let naa = (6u128 << 124)
        | (names::NAA_COMPANY_ID << names::NAA_ID_BITS)
        | (bits >> (128 - names::NAA_ID_BITS));
    format!("naa.{naa:032x}")
}

fn vol(n: u8) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

fn mount_cap(fs: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

impl Rig {
    fn staging(&self, id: &str) -> String {
        self.dir
            .path()
            .join("staging")
            .join(id)
            .to_string_lossy()
            .into_owned()
    }
    fn target_path(&self, id: &str, pod: &str) -> String {
        self.dir
            .path()
            .join("pods")
            .join(pod)
            .join(id)
            .to_string_lossy()
            .into_owned()
    }
    fn stage_req(
        &self,
        id: &str,
        lun: u32,
        cap: csi::VolumeCapability,
    ) -> csi::NodeStageVolumeRequest {
        let mut pc = HashMap::new();
        pc.insert(keys::TARGET.to_string(), TARGET.to_string());
        pc.insert(keys::LUN.to_string(), lun.to_string());
        pc.insert(keys::PORTAL.to_string(), PORTAL.to_string());
        csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            publish_context: pc,
            staging_target_path: self.staging(id),
            volume_capability: Some(cap),
            secrets: HashMap::new(),
            volume_context: HashMap::new(),
        }
    }
    async fn stage(
        &self,
        id: &str,
        lun: u32,
        cap: csi::VolumeCapability,
    ) -> std::result::Result<(), tonic::Status> {
        self.node
            .node_stage_volume(Request::new(self.stage_req(id, lun, cap)))
            .await
            .map(|_| ())
    }
    async fn unstage(&self, id: &str) -> std::result::Result<(), tonic::Status> {
        self.node
            .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: self.staging(id),
            }))
            .await
            .map(|_| ())
    }
    async fn publish(
        &self,
        id: &str,
        pod: &str,
        ro: bool,
        cap: csi::VolumeCapability,
    ) -> std::result::Result<(), tonic::Status> {
        self.node
            .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                publish_context: HashMap::new(),
                staging_target_path: self.staging(id),
                target_path: self.target_path(id, pod),
                volume_capability: Some(cap),
                readonly: ro,
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            }))
            .await
            .map(|_| ())
    }
    async fn unpublish(&self, id: &str, pod: &str) -> std::result::Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: self.target_path(id, pod),
            }))
            .await
            .map(|_| ())
    }
    /// Stages every volume of [`Fake::export_many`] at once; every stage
    /// must succeed.
    async fn stage_all_at_once(&self, ids: &[String], cap: csi::VolumeCapability) {
        let mut tasks = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let node = self.node.clone();
            let req = self.stage_req(id, i as u32 + 1, cap.clone());
            tasks.push(tokio::spawn(async move {
                node.node_stage_volume(Request::new(req)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
    async fn expand(
        &self,
        id: &str,
        required_bytes: i64,
    ) -> std::result::Result<csi::NodeExpandVolumeResponse, tonic::Status> {
        self.node
            .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: self.target_path(id, "p"),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes,
                    limit_bytes: 0,
                }),
                staging_target_path: self.staging(id),
                volume_capability: None,
                secrets: HashMap::new(),
            }))
            .await
            .map(Response::into_inner)
    }
    fn mounted(&self, p: &str) -> Option<MountInfo> {
        self.fake.st().mounts.get(Path::new(p)).cloned()
    }
}

#[tokio::test]
async fn stage_formats_a_blank_device_once_and_is_idempotent() {
    let r = rig();
    let v = vol(1);
    r.fake.export(TARGET, 1, "/dev/sdb", &v, None);
    r.stage(&v, 1, mount_cap("ext4")).await.unwrap();
    assert_eq!(r.fake.st().formats, vec![PathBuf::from("/dev/sdb")]);
    assert_eq!(r.mounted(&r.staging(&v)).unwrap().source, "/dev/sdb");
    // Again: nothing new happens.
    r.stage(&v, 1, mount_cap("ext4")).await.unwrap();
    // Incompatible re-stage (other filesystem, raw block): ALREADY_EXISTS.
    assert_eq!(
        r.stage(&v, 1, mount_cap("xfs")).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        r.stage(&v, 1, block_cap()).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(r.fake.st().formats.len(), 1);
    assert_eq!(r.fake.logins.load(Ordering::SeqCst), 1);
    // Publish, twice; read-only mismatch on the same path is ALREADY_EXISTS.
    r.publish(&v, "p1", false, mount_cap("ext4")).await.unwrap();
    r.publish(&v, "p1", false, mount_cap("ext4")).await.unwrap();
    assert_eq!(
        r.publish(&v, "p1", true, mount_cap("ext4"))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    r.publish(&v, "p2", true, mount_cap("ext4")).await.unwrap();
    let m = r.mounted(&r.target_path(&v, "p2")).unwrap();
    assert!(m.readonly);
    assert_eq!(m.source, "/dev/sdb");
    // Down again, each step twice.
    for _ in 0..2 {
        r.unpublish(&v, "p1").await.unwrap();
        r.unpublish(&v, "p2").await.unwrap();
    }
    assert!(r.mounted(&r.target_path(&v, "p1")).is_none());
    for _ in 0..2 {
        r.unstage(&v).await.unwrap();
    }
    assert!(r.mounted(&r.staging(&v)).is_none());
    assert_eq!(r.fake.st().logouts, vec![TARGET.to_string()]);
    // Stage again: the filesystem is there, no second format.
    r.stage(&v, 1, mount_cap("ext4")).await.unwrap();
    assert_eq!(r.fake.st().formats.len(), 1);
}

/// A LUN that proves it was never written is blank without a probe and
/// formatted without zeroing; one that cannot prove it is probed and
/// formatted the slow way.
#[tokio::test]
async fn a_never_written_device_skips_the_probe_and_the_zeroing() {
    let r = rig();
    let (a, b) = (vol(1), vol(2));
    r.fake.export(TARGET, 1, "/dev/sdb", &a, None);
    r.fake.export(TARGET, 2, "/dev/sdc", &b, None);
    r.fake
        .st()
        .disks
        .get_mut(Path::new("/dev/sdb"))
        .unwrap()
        .fresh = true;
    r.stage(&a, 1, mount_cap("ext4")).await.unwrap();
    assert_eq!(r.fake.st().signature_probes, 0);
    assert_eq!(r.fake.st().prezeroed, vec![PathBuf::from("/dev/sdb")]);
    r.stage(&b, 2, mount_cap("ext4")).await.unwrap();
    assert!(r.fake.st().signature_probes >= 1);
    assert_eq!(r.fake.st().prezeroed, vec![PathBuf::from("/dev/sdb")]);
    assert_eq!(r.fake.st().formats.len(), 2);
    // Staged again after an unstage: written now, so probed, not formatted.
    r.unstage(&a).await.unwrap();
    let probes = r.fake.st().signature_probes;
    r.stage(&a, 1, mount_cap("ext4")).await.unwrap();
    assert_eq!(r.fake.st().signature_probes, probes + 1);
    assert_eq!(r.fake.st().formats.len(), 2);
}

#[tokio::test]
async fn a_device_with_a_signature_is_never_formatted() {
    let r = rig();
    let (a, b, c) = (vol(1), vol(2), vol(3));
    r.fake.export(TARGET, 1, "/dev/sdb", &a, Some("xfs"));
    r.fake
        .export(TARGET, 2, "/dev/sdc", &b, Some("partition table gpt"));
    r.fake.export(TARGET, 3, "/dev/sdd", &c, Some("ext4"));
    let e = r.stage(&a, 1, mount_cap("ext4")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(r.mounted(&r.staging(&a)).is_none());
    let e = r.stage(&b, 2, mount_cap("ext4")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // The requested filesystem already there: mounted as is.
    r.stage(&c, 3, mount_cap("ext4")).await.unwrap();
    assert!(r.fake.st().formats.is_empty());
    assert_eq!(r.mounted(&r.staging(&c)).unwrap().source, "/dev/sdd");
}

#[tokio::test]
async fn a_device_of_another_volume_is_refused() {
    let r = rig();
    let (mine, other) = (vol(1), vol(9));
    // LUN 1 answers with the other volume's serial.
    r.fake.export(TARGET, 1, "/dev/sdb", &other, None);
    let e = r.stage(&mine, 1, mount_cap("ext4")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("is not volume"), "{e:?}");
    assert!(r.fake.st().formats.is_empty());
    assert!(r.mounted(&r.staging(&mine)).is_none());
    // A WWN that does not match the controller's NAA is refused too.
    r.fake.export(TARGET, 2, "/dev/sdc", &mine, None);
    r.fake.set_wwn("/dev/sdc", "naa.6aaaa");
    let mut req = r.stage_req(&mine, 2, block_cap());
    req.publish_context.insert(keys::NAA.into(), "6bbbb".into());
    let e = r
        .node
        .node_stage_volume(Request::new(req.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    req.publish_context.insert(keys::NAA.into(), "6aaaa".into());
    r.node.node_stage_volume(Request::new(req)).await.unwrap();
    // The right serial but an ironblock WWN of another volume: refused
    // even without the controller's NAA.
    let third = vol(3);
    r.fake.export(TARGET, 3, "/dev/sdd", &third, None);
    r.fake.set_wwn("/dev/sdd", &ironblock_wwn(&vol(4)));
    let e = r.stage(&third, 3, block_cap()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    r.fake.set_wwn("/dev/sdd", &ironblock_wwn(&third));
    r.stage(&third, 3, block_cap()).await.unwrap();
}

#[tokio::test]
async fn a_second_operation_on_a_busy_volume_is_aborted() {
    let r = rig();
    let v = vol(1);
    r.fake.export(TARGET, 1, "/dev/sdb", &v, None);
    *r.fake.login_delay.lock().unwrap() = Duration::from_millis(400);
    let node = r.node.clone();
    let req = r.stage_req(&v, 1, mount_cap("ext4"));
    let first = tokio::spawn(async move { node.node_stage_volume(Request::new(req)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(r.node.locks().is_locked(&v));
    assert_eq!(
        r.stage(&v, 1, mount_cap("ext4")).await.unwrap_err().code(),
        Code::Aborted
    );
    assert_eq!(r.unstage(&v).await.unwrap_err().code(), Code::Aborted);
    first.await.unwrap().unwrap();
    assert!(!r.node.locks().is_locked(&v));
    r.stage(&v, 1, mount_cap("ext4")).await.unwrap();
}

#[tokio::test]
async fn unstaging_one_lun_keeps_the_session_others_use() {
    let r = rig();
    let (a, b) = (vol(1), vol(2));
    r.fake.export(TARGET, 1, "/dev/sdb", &a, None);
    r.fake.export(TARGET, 2, "/dev/sdc", &b, None);
    r.stage(&a, 1, mount_cap("ext4")).await.unwrap();
    r.stage(&b, 2, block_cap()).await.unwrap();
    r.unstage(&a).await.unwrap();
    {
        let s = r.fake.st();
        assert_eq!(s.removed, vec![PathBuf::from("/dev/sdb")]);
        assert!(s.logouts.is_empty(), "logged out a session still in use");
        assert!(s.attached.contains(Path::new("/dev/sdc")));
    }
    r.unstage(&b).await.unwrap();
    assert_eq!(r.fake.st().logouts, vec![TARGET.to_string()]);
}

#[tokio::test]
async fn the_shared_session_survives_a_plugin_restart() {
    let r = rig();
    let (a, b) = (vol(1), vol(2));
    r.fake.export(TARGET, 1, "/dev/sdb", &a, None);
    r.fake.export(TARGET, 2, "/dev/sdc", &b, None);
    r.stage(&a, 1, block_cap()).await.unwrap();
    r.stage(&b, 2, block_cap()).await.unwrap();
    // A new process over the same state directory.
    let mut cfg = NodeConfig::new("iqn.x:n1", &r.dir.path().join("state"));
    cfg.device_timeout = Duration::from_millis(600);
    let node2 = NodeService::new(cfg, r.fake.clone()).unwrap();
    node2
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: a.clone(),
            staging_target_path: r.staging(&a),
        }))
        .await
        .unwrap();
    assert!(r.fake.st().logouts.is_empty());
}

#[tokio::test]
async fn a_read_only_publication_is_mounted_ro_and_never_formatted() {
    let r = rig();
    let (blank, formatted, reader) = (vol(1), vol(2), vol(3));
    r.fake.export(TARGET, 1, "/dev/sdb", &blank, None);
    r.fake
        .export(TARGET, 2, "/dev/sdc", &formatted, Some("ext4"));
    r.fake.export(TARGET, 3, "/dev/sdd", &reader, Some("ext4"));
    let ro_req = |id: &str, lun: u32| {
        let mut q = r.stage_req(id, lun, mount_cap("ext4"));
        q.publish_context
            .insert(keys::READ_ONLY.to_string(), "true".to_string());
        q
    };
    let e = r
        .node
        .node_stage_volume(Request::new(ro_req(&blank, 1)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(r.fake.st().formats.is_empty(), "never formatted");
    assert!(r.node.state.format_failed(&blank).is_none(), "no marker");
    r.node
        .node_stage_volume(Request::new(ro_req(&formatted, 2)))
        .await
        .unwrap();
    let m = r.mounted(&r.staging(&formatted)).unwrap();
    assert!(m.readonly && m.source == "/dev/sdc", "{m:?}");
    // A reader-only access mode alone is enough.
    let mut cap = mount_cap("ext4");
    cap.access_mode = Some(AccessMode {
        mode: Mode::MultiNodeReaderOnly as i32,
    });
    r.stage(&reader, 3, cap).await.unwrap();
    assert!(r.mounted(&r.staging(&reader)).unwrap().readonly);
    assert!(r.fake.st().formats.is_empty());
    // The blank volume published read-write later is formatted as usual.
    r.stage(&blank, 1, mount_cap("ext4")).await.unwrap();
    assert_eq!(r.fake.st().formats, vec![PathBuf::from("/dev/sdb")]);
}

/// Staging again with the other read-only-ness is an incompatible
/// capability (ALREADY_EXISTS, nothing remounted), either way round; the
/// same mode again is idempotent. A record from a plugin that did not keep
/// read-only-ness still loads and is judged by the staging mount's flags.
#[tokio::test]
async fn a_restage_with_the_other_read_only_ness_is_already_exists() {
    let r = rig();
    let (rw, ro, blk, old) = (vol(1), vol(2), vol(3), vol(4));
    r.fake.export(TARGET, 1, "/dev/sdb", &rw, Some("ext4"));
    r.fake.export(TARGET, 2, "/dev/sdc", &ro, Some("ext4"));
    r.fake.export(TARGET, 3, "/dev/sdd", &blk, None);
    r.fake.export(TARGET, 4, "/dev/sde", &old, Some("ext4"));
    let req = |id: &str, lun: u32, cap: csi::VolumeCapability, read_only: bool| {
        let mut q = r.stage_req(id, lun, cap);
        if read_only {
            q.publish_context
                .insert(keys::READ_ONLY.to_string(), "true".to_string());
        }
        q
    };
    let stage = |q: csi::NodeStageVolumeRequest| {
        let node = r.node.clone();
        async move { node.node_stage_volume(Request::new(q)).await.map(|_| ()) }
    };

    // Read-write, then read-only at the same path.
    stage(req(&rw, 1, mount_cap("ext4"), false)).await.unwrap();
    stage(req(&rw, 1, mount_cap("ext4"), false)).await.unwrap();
    let e = stage(req(&rw, 1, mount_cap("ext4"), true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(
        !r.mounted(&r.staging(&rw)).unwrap().readonly,
        "not remounted"
    );
    assert_eq!(
        r.node.state.get(&rw).unwrap().unwrap().read_only,
        Some(false)
    );

    // Read-only (by the publish context), then read-write.
    stage(req(&ro, 2, mount_cap("ext4"), true)).await.unwrap();
    stage(req(&ro, 2, mount_cap("ext4"), true)).await.unwrap();
    let e = stage(req(&ro, 2, mount_cap("ext4"), false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(
        r.mounted(&r.staging(&ro)).unwrap().readonly,
        "not remounted"
    );
    assert_eq!(
        r.node.state.get(&ro).unwrap().unwrap().read_only,
        Some(true)
    );
    // A reader-only access mode is read-only too: the same mode again.
    let mut reader = mount_cap("ext4");
    reader.access_mode = Some(AccessMode {
        mode: Mode::MultiNodeReaderOnly as i32,
    });
    stage(req(&ro, 2, reader.clone(), false)).await.unwrap();
    let e = stage(req(&rw, 1, reader, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Raw block: recorded and compared the same way.
    stage(req(&blk, 3, block_cap(), true)).await.unwrap();
    stage(req(&blk, 3, block_cap(), true)).await.unwrap();
    let e = stage(req(&blk, 3, block_cap(), false)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    assert!(r.fake.st().formats.is_empty());
    assert_eq!(r.fake.logins.load(Ordering::SeqCst), 1);

    // An older plugin's record (no read_only field) of a read-only stage.
    stage(req(&old, 4, mount_cap("ext4"), true)).await.unwrap();
    let file = r.dir.path().join("state").join(format!("{old}.json"));
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert!(rec.as_object_mut().unwrap().remove("read_only").is_some());
    std::fs::write(&file, serde_json::to_vec(&rec).unwrap()).unwrap();
    assert_eq!(r.node.state.get(&old).unwrap().unwrap().read_only, None);
    assert_eq!(r.node.state.all().unwrap().len(), 4, "every record loads");
    stage(req(&old, 4, mount_cap("ext4"), true)).await.unwrap();
    let e = stage(req(&old, 4, mount_cap("ext4"), false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(r.mounted(&r.staging(&old)).unwrap().readonly);
}

#[tokio::test]
async fn a_failed_format_is_not_retried() {
    let r = rig();
    let v = vol(1);
    r.fake.export(TARGET, 1, "/dev/sdb", &v, None);
    r.fake.st().fail_format = true;
    assert_eq!(
        r.stage(&v, 1, mount_cap("ext4")).await.unwrap_err().code(),
        Code::Internal
    );
    r.fake.st().fail_format = false;
    let e = r.stage(&v, 1, mount_cap("ext4")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(r.fake.st().formats.len(), 1);
}

#[tokio::test]
async fn concurrent_stages_share_one_login() {
    let r = rig();
    *r.fake.login_delay.lock().unwrap() = Duration::from_millis(200);
    let ids = r.fake.export_many(20);
    r.stage_all_at_once(&ids, block_cap()).await;
    assert_eq!(r.fake.logins.load(Ordering::SeqCst), 1);
    assert_eq!(r.fake.logins_peak.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stale_staging_mount_is_repaired_and_a_live_one_refused() {
    let r = rig();
    let (a, b) = (vol(1), vol(2));
    r.fake.export(TARGET, 1, "/dev/sdb", &a, Some("ext4"));
    r.fake.export(TARGET, 2, "/dev/sdc", &b, Some("ext4"));
    // A vanished device still mounted at a's staging path.
    r.fake.st().mounts.insert(
        PathBuf::from(r.staging(&a)),
        MountInfo {
            source: "/dev/sdz".into(),
            fs_type: "ext4".into(),
            readonly: false,
        },
    );
    r.stage(&a, 1, mount_cap("ext4")).await.unwrap();
    assert_eq!(r.mounted(&r.staging(&a)).unwrap().source, "/dev/sdb");
    // A live device of another volume mounted at b's staging path.
    r.fake.st().mounts.insert(
        PathBuf::from(r.staging(&b)),
        MountInfo {
            source: "/dev/sdb".into(),
            fs_type: "ext4".into(),
            readonly: false,
        },
    );
    let e = r.stage(&b, 2, mount_cap("ext4")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}

#[tokio::test]
async fn argument_and_state_errors() {
    let r = rig();
    let v = vol(1);
    let missing: [fn(&mut csi::NodeStageVolumeRequest); 3] = [
        |q| q.volume_id.clear(),
        |q| q.staging_target_path.clear(),
        |q| q.volume_capability = None,
    ];
    for (k, leave_out) in missing.iter().enumerate() {
        let mut req = r.stage_req(&v, 1, mount_cap("ext4"));
        leave_out(&mut req);
        let e = r.node.node_stage_volume(Request::new(req)).await;
        assert_eq!(
            e.err().map(|e| e.code()),
            Some(Code::InvalidArgument),
            "{k}"
        );
    }
    // Publish without its required fields: INVALID_ARGUMENT, checked
    // before the staging path or the node's state.
    let missing: [fn(&mut csi::NodePublishVolumeRequest); 3] = [
        |q| q.target_path.clear(),
        |q| q.volume_capability = None,
        |q| {
            q.target_path.clear();
            q.staging_target_path.clear();
        },
    ];
    for (k, leave_out) in missing.iter().enumerate() {
        let mut req = csi::NodePublishVolumeRequest {
            volume_id: v.clone(),
            staging_target_path: r.staging(&v),
            target_path: r.target_path(&v, "p"),
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        };
        leave_out(&mut req);
        let e = r.node.node_publish_volume(Request::new(req)).await;
        assert_eq!(
            e.err().map(|e| e.code()),
            Some(Code::InvalidArgument),
            "publish {k}"
        );
    }
    // Publish before stage.
    assert_eq!(
        r.publish(&v, "p", false, mount_cap("ext4"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    // Unpublish / unstage of something never done: OK.
    r.unpublish(&v, "p").await.unwrap();
    r.unstage(&v).await.unwrap();
    // Stats of an unknown volume: NOT_FOUND.
    let e = r
        .node
        .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: v.clone(),
            volume_path: r.staging(&v),
            staging_target_path: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The LUN never appears: DEADLINE_EXCEEDED, nothing staged.
    let e = r.stage(&v, 7, block_cap()).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
}

#[tokio::test]
async fn stats_report_usage_and_a_gone_device() {
    let r = rig();
    let v = vol(1);
    r.fake.export(TARGET, 1, "/dev/sdb", &v, None);
    r.stage(&v, 1, mount_cap("ext4")).await.unwrap();
    r.publish(&v, "p", false, mount_cap("ext4")).await.unwrap();
    let req = csi::NodeGetVolumeStatsRequest {
        volume_id: v.clone(),
        volume_path: r.target_path(&v, "p"),
        staging_target_path: r.staging(&v),
    };
    let s = r
        .node
        .node_get_volume_stats(Request::new(req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.usage.len(), 2);
    assert!(!s.volume_condition.unwrap().abnormal);
    r.fake.st().attached.remove(Path::new("/dev/sdb"));
    let s = r
        .node
        .node_get_volume_stats(Request::new(req))
        .await
        .unwrap()
        .into_inner();
    assert!(s.volume_condition.unwrap().abnormal);
    // Expansion with a required size above the device's: OUT_OF_RANGE.
    r.fake.st().attached.insert(PathBuf::from("/dev/sdb"));
    let e = r.expand(&v, 2 << 30).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
}

#[tokio::test]
async fn stages_run_in_parallel_up_to_the_bound() {
    let r = rig_with(|c| c.max_parallel = 3);
    *r.fake.format_delay.lock().unwrap() = Duration::from_millis(100);
    let ids = r.fake.export_many(12);
    let start = std::time::Instant::now();
    r.stage_all_at_once(&ids, mount_cap("ext4")).await;
    let peak = r.fake.formats_peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "more than max_parallel stages at once: {peak}");
    assert!(
        peak >= 2,
        "stages did not overlap (a global lock?): peak {peak}"
    );
    assert_eq!(r.fake.st().formats.len(), 12);
    // 12 formats of 100 ms, 3 at a time: about 400 ms, not 1.2 s.
    assert!(
        start.elapsed() < Duration::from_millis(1100),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn the_global_lock_baseline_serialises_everything() {
    let r = rig_with(|c| c.global_lock = true);
    *r.fake.format_delay.lock().unwrap() = Duration::from_millis(30);
    let ids = r.fake.export_many(6);
    r.stage_all_at_once(&ids, mount_cap("ext4")).await;
    assert_eq!(r.fake.formats_peak.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_lost_session_is_logged_in_again() {
    let r = rig();
    let (a, b) = (vol(1), vol(2));
    r.fake.export(TARGET, 1, "/dev/sdb", &a, None);
    r.fake.export(TARGET, 2, "/dev/sdc", &b, None);
    r.stage(&a, 1, block_cap()).await.unwrap();
    // The session drops behind the plugin's back.
    r.fake.logout(PORTAL, TARGET).await.unwrap();
    r.stage(&b, 2, block_cap()).await.unwrap();
    assert_eq!(r.fake.logins.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unstage_refuses_while_published() {
    let r = rig();
    let v = vol(1);
    r.fake.export(TARGET, 1, "/dev/sdb", &v, None);
    r.stage(&v, 1, mount_cap("ext4")).await.unwrap();
    r.publish(&v, "p", false, mount_cap("ext4")).await.unwrap();
    assert_eq!(
        r.unstage(&v).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert!(r.fake.st().removed.is_empty(), "device removed under a pod");
    assert!(r.mounted(&r.staging(&v)).is_some());
    r.unpublish(&v, "p").await.unwrap();
    r.unstage(&v).await.unwrap();
    assert_eq!(r.fake.st().removed, vec![PathBuf::from("/dev/sdb")]);
}

/// NodeExpandVolume right after ControllerExpand: the LUN shows the new
/// capacity only once the chunks applied it (their next heartbeat), so the
/// node rescans until the device reports the required size instead of
/// answering OUT_OF_RANGE at once (seen against the real initiator).
#[tokio::test]
async fn expand_waits_for_the_lun_to_show_the_new_capacity() {
    let r = rig_with(|c| c.device_timeout = Duration::from_secs(5));
    let v = vol(1);
    r.fake.export(TARGET, 1, "/dev/sdb", &v, None);
    r.stage(&v, 1, mount_cap("ext4")).await.unwrap();
    r.publish(&v, "p", false, mount_cap("ext4")).await.unwrap();
    let fake = r.fake.clone();
    let grow = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        if let Some(d) = fake.st().disks.get_mut(Path::new("/dev/sdb")) {
            d.size = 2 << 30;
        }
    });
    let t = std::time::Instant::now();
    let resp = r.expand(&v, 2 << 30).await.unwrap();
    grow.await.unwrap();
    assert_eq!(resp.capacity_bytes, 2 << 30);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
}

/// A LUN that shows up only some time after the stage began (the chunks
/// apply a new ACL with their next heartbeat, after ControllerPublish
/// returned): the node keeps rescanning instead of rescanning once and
/// waiting out the whole device timeout (seen against the real initiator).
#[tokio::test]
async fn stage_rescans_until_a_late_lun_appears() {
    let r = rig_with(|c| c.device_timeout = Duration::from_secs(6));
    let (v1, v2) = (vol(1), vol(2));
    r.fake.export(TARGET, 1, "/dev/sdb", &v1, None);
    r.stage(&v1, 1, mount_cap("ext4")).await.unwrap();
    let fake = r.fake.clone();
    let v2c = v2.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        fake.export(TARGET, 2, "/dev/sdc", &v2c, None);
    });
    let t = std::time::Instant::now();
    r.stage(&v2, 2, mount_cap("ext4")).await.unwrap();
    late.await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the late LUN was found only after {:?}",
        t.elapsed()
    );
}

/// NodeGetInfo: the node id, and the cluster segment as the node's
/// accessible topology (the kubelet labels the node with it); none
/// without a cluster id source (library use only: the binary requires
/// one).
#[tokio::test]
async fn node_info_reports_the_cluster_segment() {
    const CLUSTER: &str = "0f1e2d3c-4b5a-4697-8877-665544332211";
    let r = rig_with(|c| {
        c.cluster = Some(Arc::new(
            crate::topology::ClusterId::new(Some(&CLUSTER.to_ascii_uppercase()), None).unwrap(),
        ));
    });
    let info = r
        .node
        .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "iqn.2026-11.dev.ironblock.node:n1");
    let t = info.accessible_topology.expect("accessible topology");
    assert_eq!(
        t.segments,
        HashMap::from([(
            "topology.ironblock.io/cluster".to_string(),
            CLUSTER.to_string()
        )]),
        "one segment, the canonical (lowercase) cluster id"
    );
    let plain = rig();
    let info = plain
        .node
        .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.accessible_topology, None);
}

#[tokio::test]
async fn stage_retries_a_transient_discovery_failure_within_its_deadline() {
    let r = rig();
    let v = vol(1);
    r.fake.export(TARGET, 1, "/dev/sdb", &v, None);
    // Discovery finds no portal twice (a portal catching up), then works:
    // the stage succeeds without the caller retrying.
    r.fake.fail_logins.store(2, Ordering::SeqCst);
    r.stage(&v, 1, mount_cap("ext4")).await.unwrap();
    assert_eq!(r.fake.logins.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn stage_gives_up_unavailable_when_discovery_keeps_failing() {
    let r = rig();
    let v = vol(1);
    r.fake.export(TARGET, 1, "/dev/sdb", &v, None);
    r.fake.fail_logins.store(usize::MAX, Ordering::SeqCst);
    let e = r.stage(&v, 1, mount_cap("ext4")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("No portals found"), "{e:?}");
    // Bounded: tried with a doubling backoff up to the deadline
    // (LOGIN_RETRY_FOR), not once and not forever.
    let tries = r.fake.logins.load(Ordering::SeqCst);
    assert!((5..=20).contains(&tries), "{tries} tries");
}
