//! The Node service: stage (login, find the device, verify its identity,
//! format only a blank device, mount), publish (bind mounts), and the
//! reverse, all idempotent; stats and expansion.
//!
//! Concurrency: a per-volume lock (a second call on a busy volume gets
//! ABORTED), logins coalesced per portal + target and rescans per target
//! ([`SingleFlight`]), at most `max_parallel` stages/unstages running their
//! host steps at once. No global lock.
//!
//! Safety with disks: the device found for the LUN must report the
//! volume's VPD serial (and NAA id when the controller passed it) before
//! anything touches it; a device with any filesystem or partition signature
//! is never formatted (mounted when it is the requested filesystem, refused
//! otherwise); a failed format is recorded and never retried automatically;
//! a staging path with another device mounted on it is repaired only when
//! that device is gone (a stale mount after a reconnect), refused otherwise;
//! unstaging removes the LUN's device and logs out of the target only when
//! no other staged volume uses that target.

pub mod host;
pub mod initiator;
pub mod sg;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ironblock_proto::csi;
use ironblock_proto::csi::node_server::Node;
use ironblock_proto::csi::node_service_capability::rpc::Type as Cap;
use ironblock_proto::csi::volume_capability::AccessType;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub use initiator::{Chap, DeviceIdentity, FsStats, Initiator, InitiatorError, MountInfo};
pub use state::{Staged, StateDir};

use crate::error::{CsiError, Result};
use crate::keys;
use crate::locks::{SingleFlight, VolumeLocks};
use crate::names::{self, Access};
use crate::rpc::answer;

/// How long NodeStage keeps trying discovery and login that fail as
/// transient (unreachable, refused) before it answers UNAVAILABLE.
pub const LOGIN_RETRY_FOR: Duration = Duration::from_secs(10);

/// Node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// NodeGetInfo's node id: the initiator IQN (ControllerPublish puts it
    /// on the LUN ACL).
    pub node_id: String,
    /// Portal used when neither context names one.
    pub portal: Option<String>,
    /// Where staged volumes are recorded.
    pub state_dir: PathBuf,
    /// How long to wait for the LUN's device to appear after login.
    pub device_timeout: Duration,
    /// Stages/unstages running host steps at once.
    pub max_parallel: usize,
    /// Default filesystem.
    pub default_fs: String,
    /// Run every node operation under one process-wide lock: the naive
    /// design, kept only as the baseline of the 100-volume benchmark.
    pub global_lock: bool,
    /// The cluster this node reaches (NodeGetInfo's accessible topology,
    /// [`crate::topology`]); None reports no topology (the binary always
    /// sets it).
    pub cluster: Option<Arc<crate::topology::ClusterId>>,
}

impl NodeConfig {
    /// Defaults for `node_id` and `state_dir`.
    pub fn new(node_id: &str, state_dir: &Path) -> NodeConfig {
        NodeConfig {
            node_id: node_id.to_string(),
            portal: None,
            state_dir: state_dir.to_path_buf(),
            device_timeout: Duration::from_secs(30),
            max_parallel: 16,
            default_fs: "ext4".into(),
            global_lock: false,
            cluster: None,
        }
    }
}

/// The Node service over an [`Initiator`].
pub struct NodeService {
    cfg: NodeConfig,
    host: Arc<dyn Initiator>,
    state: StateDir,
    locks: Arc<VolumeLocks>,
    logins: SingleFlight<std::result::Result<(), InitiatorError>>,
    rescans: SingleFlight<std::result::Result<(), InitiatorError>>,
    /// portal|target pairs this process logged in to (a later stage on the
    /// same target rescans instead of running discovery + login again).
    sessions: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Per portal|target: stages hold it shared, the logout decision of an
    /// unstage exclusively, so a session is never logged out under a stage
    /// that is about to use it.
    targets: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    parallel: Semaphore,
    global: tokio::sync::Mutex<()>,
}

fn required<'a>(what: &str, v: &'a str) -> Result<&'a str> {
    if v.is_empty() {
        Err(CsiError::InvalidArgument(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

fn host_err(what: &str, e: InitiatorError) -> CsiError {
    match e {
        InitiatorError::Timeout(_) => CsiError::DeadlineExceeded(format!("{what}: {e}")),
        InitiatorError::Unreachable(_) => CsiError::Unavailable(format!("{what}: {e}")),
        InitiatorError::Failed { .. } => CsiError::Internal(format!("{what}: {e}")),
    }
}

/// NodeStage/NodePublish: a capability the volume does not support is
/// "exceeds capabilities", FAILED_PRECONDITION in the spec.
fn exceeds<T>(r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        CsiError::InvalidArgument(m) => CsiError::FailedPrecondition(m),
        other => other,
    })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The context value `key` from the publish context, else the volume
/// context.
fn ctx<'a>(
    key: &str,
    publish: &'a std::collections::HashMap<String, String>,
    volume: &'a std::collections::HashMap<String, String>,
) -> Option<&'a str> {
    publish
        .get(key)
        .or_else(|| volume.get(key))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

impl NodeService {
    /// A node service; opens (creates) the state directory.
    pub fn new(cfg: NodeConfig, host: Arc<dyn Initiator>) -> Result<NodeService> {
        let state = StateDir::open(&cfg.state_dir)?;
        let parallel = Semaphore::new(cfg.max_parallel.max(1));
        Ok(NodeService {
            cfg,
            host,
            state,
            locks: VolumeLocks::new(),
            logins: SingleFlight::default(),
            rescans: SingleFlight::default(),
            sessions: Default::default(),
            targets: Default::default(),
            parallel,
            global: tokio::sync::Mutex::new(()),
        })
    }

    /// The baseline's global lock, when configured.
    async fn global(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if self.cfg.global_lock {
            Some(self.global.lock().await)
        } else {
            None
        }
    }

    /// The per-volume locks (tests).
    pub fn locks(&self) -> &Arc<VolumeLocks> {
        &self.locks
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn target_lock(&self, portal: &str, target: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(format!("{portal}|{target}"))
            .or_default()
            .clone()
    }

    /// Logs in unless this process already did (coalesced per portal +
    /// target). Discovery or a login that fails as unreachable or refused
    /// (a portal restarting, a VIP changing hands, a chunk fenced out for a
    /// moment) is tried again with a bounded backoff (100 ms doubling to
    /// 1 s) for up to [`LOGIN_RETRY_FOR`] before the call gives up with
    /// UNAVAILABLE: every failed call costs the caller (kubelet) its own,
    /// much longer, exponential backoff.
    async fn login(&self, portal: &str, target: &str, chap: Option<Chap>) -> Result<()> {
        let key = format!("{portal}|{target}");
        if self.sessions().contains(&key) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + LOGIN_RETRY_FOR;
        let mut backoff = Duration::from_millis(100);
        let mut tries = 0u32;
        loop {
            let host = self.host.clone();
            let (p, t, c) = (portal.to_string(), target.to_string(), chap.clone());
            tries += 1;
            match self
                .logins
                .run(&key, async move { host.login(&p, &t, c.as_ref()).await })
                .await
            {
                Ok(()) => break,
                Err(InitiatorError::Unreachable(why))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    warn!(tries, %why, ?backoff, "discovery or login failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(host_err(
                        &format!("login to {target} via {portal} ({tries} tries)"),
                        e,
                    ))
                }
            }
        }
        self.sessions().insert(key);
        Ok(())
    }

    async fn rescan(&self, target: &str) -> Result<()> {
        let host = self.host.clone();
        let t = target.to_string();
        self.rescans
            .run(target, async move { host.rescan(&t).await })
            .await
            .map_err(|e| host_err(&format!("rescan {target}"), e))
    }

    async fn wait_device(&self, portal: &str, target: &str, lun: u32) -> Result<PathBuf> {
        let deadline = tokio::time::Instant::now() + self.cfg.device_timeout;
        // Rescan again and again (coalesced per target), not once: right
        // after ControllerPublish the chunks may not expose the LUN yet
        // (they apply the ACL with their next heartbeat), so a single early
        // rescan can miss it for good.
        let mut next_rescan = tokio::time::Instant::now();
        let mut rescan_every = Duration::from_millis(500);
        loop {
            if let Some(d) = self
                .host
                .find_device(portal, target, lun)
                .await
                .map_err(|e| host_err("find device", e))?
            {
                return Ok(d);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CsiError::DeadlineExceeded(format!(
                    "LUN {lun} of {target} did not appear within {:?}",
                    self.cfg.device_timeout
                )));
            }
            if tokio::time::Instant::now() >= next_rescan {
                self.rescan(target).await?;
                next_rescan = tokio::time::Instant::now() + rescan_every;
                rescan_every = (rescan_every * 2).min(Duration::from_secs(2));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Refuses a device that is not this volume's LUN.
    async fn verify_identity(
        &self,
        device: &Path,
        volume_id: &str,
        naa: Option<&str>,
    ) -> Result<()> {
        let id = self
            .host
            .identity(device)
            .await
            .map_err(|e| host_err("read device identity", e))?;
        let want = names::serial_of(volume_id);
        let serial_ok = id
            .serial
            .as_deref()
            .is_some_and(|s| s.trim().eq_ignore_ascii_case(&want));
        let wwn_ok = match (naa, id.wwn.as_deref()) {
            (Some(n), Some(w)) => w
                .to_ascii_lowercase()
                .trim_start_matches("naa.")
                .eq_ignore_ascii_case(n),
            (Some(_), None) => false,
            (None, _) => true,
        };
        // An ironblock WWN names the volume itself (its top 100 bits).
        let wwn_names_other = id
            .wwn
            .as_deref()
            .and_then(names::naa_volume_prefix)
            .is_some_and(|p| !want.starts_with(&p));
        if !serial_ok || !wwn_ok || wwn_names_other {
            return Err(CsiError::FailedPrecondition(format!(
                "device {} is not volume {volume_id}: serial {:?} wwn {:?} (want serial {want}{})",
                device.display(),
                id.serial,
                id.wwn,
                naa.map(|n| format!(", naa {n}")).unwrap_or_default()
            )));
        }
        Ok(())
    }

    async fn stage(&self, req: csi::NodeStageVolumeRequest) -> Result<()> {
        let id = required("volume_id", &req.volume_id)?;
        let staging = PathBuf::from(required("staging_target_path", &req.staging_target_path)?);
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        let (access, mode) = exceeds(names::check_capability(cap))?;
        // A read-only publication: the LUN is write-protected for this node
        // (a reader-only mode, or the controller said so).
        let read_only = names::reader_only(mode)
            || req
                .publish_context
                .get(keys::READ_ONLY)
                .is_some_and(|v| v == "true");
        let (fs_type, mut flags) = match &cap.access_type {
            Some(AccessType::Mount(m)) => (
                if m.fs_type.is_empty() {
                    self.cfg.default_fs.clone()
                } else {
                    m.fs_type.clone()
                },
                m.mount_flags.clone(),
            ),
            _ => (String::new(), Vec::new()),
        };
        if read_only && !flags.iter().any(|f| f == "ro") {
            flags.push("ro".into());
        }
        let target = ctx(keys::TARGET, &req.publish_context, &req.volume_context)
            .ok_or_else(|| CsiError::InvalidArgument("publish_context lacks targetIqn".into()))?
            .to_string();
        let lun: u32 = ctx(keys::LUN, &req.publish_context, &req.volume_context)
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| CsiError::InvalidArgument("publish_context lacks a valid lun".into()))?;
        let portal = ctx(keys::PORTAL, &req.publish_context, &req.volume_context)
            .map(str::to_string)
            .or_else(|| self.cfg.portal.clone())
            .ok_or_else(|| {
                CsiError::InvalidArgument("no iSCSI portal in the context or --portal".into())
            })?;
        let naa = ctx(keys::NAA, &req.publish_context, &req.volume_context).map(str::to_string);
        let secret = |keys: &[&str]| keys.iter().find_map(|k| req.secrets.get(*k));
        let chap = match (
            secret(&["user", "node.session.auth.username"]),
            secret(&["password", "node.session.auth.password"]),
        ) {
            (Some(u), Some(p)) => Some(Chap {
                user: u.clone(),
                secret: p.clone(),
            }),
            _ => None,
        };
        let _g = self.locks.try_lock(id)?;
        let _global = self.global().await;
        let access_name = if access == Access::Block {
            "block"
        } else {
            "mount"
        };

        // Already staged?
        if let Some(s) = self.state.get(id)? {
            // Staged read-only, and asked otherwise (or the reverse)? A
            // record without it (an older plugin's) tells by the staging
            // mount's flags, if it is mounted.
            let ro_mismatch = match s.read_only {
                Some(ro) => ro != read_only,
                None if access == Access::Mount && s.staging_path == staging => {
                    let wants_ro = flags.iter().any(|f| f == "ro");
                    self.mount_at(&staging)
                        .await?
                        .is_some_and(|m| m.readonly != wants_ro)
                }
                None => false,
            };
            if s.staging_path != staging
                || s.access != access_name
                || (access == Access::Mount && s.fs_type != fs_type)
                || ro_mismatch
            {
                let ro = match s.read_only {
                    Some(ro) => format!(" (read-only: {ro})"),
                    None => String::new(),
                };
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} is staged at {} as {} {}{ro} already",
                    s.staging_path.display(),
                    s.access,
                    s.fs_type
                )));
            }
            if access == Access::Block && self.host.device_exists(&s.device).await {
                return Ok(());
            }
            if access == Access::Mount {
                if let Some(m) = self.mount_at(&staging).await? {
                    if Path::new(&m.source) == s.device && self.host.device_exists(&s.device).await
                    {
                        return Ok(());
                    }
                }
            }
            // Stale (device gone after a reconnect, mount lost): stage again.
        }
        if let Some((p, why)) = self.state.format_failed(id) {
            return Err(CsiError::FailedPrecondition(format!(
                "formatting volume {id} failed before ({why}); not retrying: inspect the device and remove {} to allow it",
                p.display()
            )));
        }

        let _permit = self
            .parallel
            .acquire()
            .await
            .map_err(|_| CsiError::Unavailable("node service shutting down".into()))?;
        let target_lock = self.target_lock(&portal, &target);
        let _shared = target_lock.read().await;
        let cached = self.sessions().contains(&format!("{portal}|{target}"));
        self.login(&portal, &target, chap.clone()).await?;
        let device = match self.wait_device(&portal, &target, lun).await {
            Ok(d) => d,
            // The session this process remembered may be gone (iscsid gave
            // up on it): log in again once.
            Err(e) if cached => {
                warn!(error = %e, "LUN not found on the remembered session; logging in again");
                self.sessions().remove(&format!("{portal}|{target}"));
                self.login(&portal, &target, chap).await?;
                self.wait_device(&portal, &target, lun).await?
            }
            Err(e) => return Err(e),
        };
        self.verify_identity(&device, id, naa.as_deref()).await?;

        if access == Access::Mount {
            // Staging path: a stale mount of a vanished device is repaired,
            // another live device is refused.
            if let Some(m) = self.mount_at(&staging).await? {
                if Path::new(&m.source) != device {
                    if self.host.device_exists(Path::new(&m.source)).await {
                        return Err(CsiError::FailedPrecondition(format!(
                            "staging path {} has another device mounted ({})",
                            staging.display(),
                            m.source
                        )));
                    }
                    warn!(stale = %m.source, "unmounting a stale staging mount");
                    self.unmount(&staging).await?;
                }
            }
            // A device that proves it was never written (a fresh thin
            // volume) is blank without reading it, and mkfs need not zero
            // what already reads as zeros.
            let never_written = self.host.never_written(&device).await;
            let signature = if never_written {
                None
            } else {
                self.host
                    .signature(&device)
                    .await
                    .map_err(|e| host_err("probe device signature", e))?
            };
            match signature {
                // Formatting cannot work on a write-protected LUN, and a
                // failure must not leave the never-retry marker behind.
                None if read_only => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {id} is published read-only and device {} carries no filesystem; refusing to format it",
                        device.display()
                    )));
                }
                None => {
                    info!(device = %device.display(), fs = %fs_type, never_written, "formatting a blank device");
                    if let Err(e) = self.host.format(&device, &fs_type, never_written).await {
                        self.state.mark_format_failed(id, &e.to_string())?;
                        return Err(host_err("format", e));
                    }
                }
                Some(sig) if sig == fs_type => {}
                Some(sig) => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "device {} of volume {id} carries a {sig} signature, not {fs_type}; refusing to format or mount it",
                        device.display()
                    )));
                }
            }
            tokio::fs::create_dir_all(&staging)
                .await
                .map_err(|e| CsiError::Internal(format!("create {}: {e}", staging.display())))?;
            if self.mount_at(&staging).await?.is_none() {
                self.host
                    .mount(&device, &staging, Some(&fs_type), &flags)
                    .await
                    .map_err(|e| host_err("mount", e))?;
            }
        }
        self.state.put(&Staged {
            volume_id: id.to_string(),
            portal,
            target,
            lun,
            device: device.clone(),
            staging_path: staging,
            access: access_name.into(),
            fs_type,
            read_only: Some(read_only),
            published: Default::default(),
        })?;
        info!(device = %device.display(), "staged");
        Ok(())
    }

    async fn mount_at(&self, p: &Path) -> Result<Option<MountInfo>> {
        self.host
            .mount_at(p)
            .await
            .map_err(|e| host_err("read mounts", e))
    }

    async fn unmount(&self, p: &Path) -> Result<()> {
        self.host
            .unmount(p)
            .await
            .map_err(|e| host_err(&format!("unmount {}", p.display()), e))
    }

    async fn unstage(&self, req: csi::NodeUnstageVolumeRequest) -> Result<()> {
        let id = required("volume_id", &req.volume_id)?;
        let staging = PathBuf::from(required("staging_target_path", &req.staging_target_path)?);
        let _g = self.locks.try_lock(id)?;
        let _global = self.global().await;
        let _permit = self
            .parallel
            .acquire()
            .await
            .map_err(|_| CsiError::Unavailable("node service shutting down".into()))?;
        let staged = self.state.get(id)?;
        // Never pull the device from under a pod: publications first.
        if let Some(s) = &staged {
            for p in s.published.keys() {
                if self.mount_at(p).await?.is_some() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {id} is still published at {}",
                        p.display()
                    )));
                }
            }
        }
        if self.mount_at(&staging).await?.is_some() {
            self.unmount(&staging).await?;
        }
        let Some(s) = staged else {
            return Ok(());
        };
        if self.host.device_exists(&s.device).await {
            // Only a device that still is this volume's LUN is removed.
            if self.verify_identity(&s.device, id, None).await.is_ok() {
                self.host
                    .remove_device(&s.device)
                    .await
                    .map_err(|e| host_err("remove device", e))?;
            }
        }
        let target_lock = self.target_lock(&s.portal, &s.target);
        let _exclusive = target_lock.write().await;
        let others = self
            .state
            .all()?
            .into_iter()
            .filter(|o| o.volume_id != s.volume_id && o.target == s.target && o.portal == s.portal)
            .count();
        if others == 0 {
            self.sessions()
                .remove(&format!("{}|{}", s.portal, s.target));
            self.host
                .logout(&s.portal, &s.target)
                .await
                .map_err(|e| host_err("logout", e))?;
        } else {
            info!(target = %s.target, others, "session kept: other staged volumes use the target");
        }
        self.state.remove(id)?;
        info!("unstaged");
        Ok(())
    }

    async fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<()> {
        // The required fields first (INVALID_ARGUMENT), then the state
        // they are checked against.
        let id = required("volume_id", &req.volume_id)?;
        let target = PathBuf::from(required("target_path", &req.target_path)?);
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        // Spec: with STAGE_UNSTAGE_VOLUME, a missing staging path is
        // FAILED_PRECONDITION for NodePublishVolume.
        if req.staging_target_path.is_empty() {
            return Err(CsiError::FailedPrecondition(
                "staging_target_path is not set (the driver stages volumes)".into(),
            ));
        }
        let staging = PathBuf::from(&req.staging_target_path);
        let (access, _) = exceeds(names::check_capability(cap))?;
        let _g = self.locks.try_lock(id)?;
        let _global = self.global().await;
        let mut s = self.state.get(id)?.ok_or_else(|| {
            CsiError::FailedPrecondition(format!("volume {id} is not staged on this node"))
        })?;
        if s.staging_path != staging {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is staged at {}, not {}",
                s.staging_path.display(),
                staging.display()
            )));
        }
        if (access == Access::Block) != (s.access == "block") {
            return Err(CsiError::AlreadyExists(format!(
                "volume {id} is staged as {}, incompatible with the requested capability",
                s.access
            )));
        }
        if let Some(&ro) = s.published.get(&target) {
            if self.mount_at(&target).await?.is_some() {
                if ro != req.readonly {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {id} is published at {} with readonly={ro}",
                        target.display()
                    )));
                }
                return Ok(());
            }
        }
        let mut opts = vec!["bind".to_string()];
        if req.readonly {
            opts.push("ro".into());
        }
        let source = if access == Access::Block {
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| CsiError::Internal(format!("create {}: {e}", parent.display())))?;
            }
            if tokio::fs::metadata(&target).await.is_err() {
                tokio::fs::write(&target, b"")
                    .await
                    .map_err(|e| CsiError::Internal(format!("create {}: {e}", target.display())))?;
            }
            s.device.clone()
        } else {
            if let Some(AccessType::Mount(m)) = &cap.access_type {
                opts.extend(m.mount_flags.iter().cloned());
            }
            tokio::fs::create_dir_all(&target)
                .await
                .map_err(|e| CsiError::Internal(format!("create {}: {e}", target.display())))?;
            staging.clone()
        };
        if self.mount_at(&target).await?.is_none() {
            self.host
                .mount(&source, &target, None, &opts)
                .await
                .map_err(|e| host_err("bind mount", e))?;
        }
        s.published.insert(target, req.readonly);
        self.state.put(&s)?;
        info!("published");
        Ok(())
    }

    async fn unpublish(&self, req: csi::NodeUnpublishVolumeRequest) -> Result<()> {
        let id = required("volume_id", &req.volume_id)?;
        let target = PathBuf::from(required("target_path", &req.target_path)?);
        let _g = self.locks.try_lock(id)?;
        let _global = self.global().await;
        if self.mount_at(&target).await?.is_some() {
            self.unmount(&target).await?;
        }
        match tokio::fs::metadata(&target).await {
            Ok(m) if m.is_dir() => {
                let _ = tokio::fs::remove_dir(&target).await;
            }
            Ok(_) => {
                let _ = tokio::fs::remove_file(&target).await;
            }
            Err(_) => {}
        }
        if let Some(mut s) = self.state.get(id)? {
            if s.published.remove(&target).is_some() {
                self.state.put(&s)?;
            }
        }
        info!("unpublished");
        Ok(())
    }

    async fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse> {
        let id = required("volume_id", &req.volume_id)?;
        let path = PathBuf::from(required("volume_path", &req.volume_path)?);
        let s = self
            .state
            .get(id)?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} is not staged on this node")))?;
        if tokio::fs::metadata(&path).await.is_err() {
            return Err(CsiError::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        if !self.host.device_exists(&s.device).await {
            return Ok(csi::NodeGetVolumeStatsResponse {
                usage: Vec::new(),
                volume_condition: Some(csi::VolumeCondition {
                    abnormal: true,
                    message: format!("device {} is gone", s.device.display()),
                }),
            });
        }
        let usage = if s.access == "block" {
            let size = self
                .host
                .device_size(&s.device)
                .await
                .map_err(|e| host_err("device size", e))?;
            vec![csi::VolumeUsage {
                available: 0,
                total: to_i64(size),
                used: 0,
                unit: csi::volume_usage::Unit::Bytes as i32,
            }]
        } else {
            let st = self
                .host
                .fs_stats(&path)
                .await
                .map_err(|e| host_err("statfs", e))?;
            vec![
                csi::VolumeUsage {
                    available: to_i64(st.available_bytes),
                    total: to_i64(st.total_bytes),
                    used: to_i64(st.used_bytes),
                    unit: csi::volume_usage::Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: to_i64(st.free_inodes),
                    total: to_i64(st.total_inodes),
                    used: to_i64(st.total_inodes.saturating_sub(st.free_inodes)),
                    unit: csi::volume_usage::Unit::Inodes as i32,
                },
            ]
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(csi::VolumeCondition {
                abnormal: false,
                message: "ok".into(),
            }),
        })
    }

    async fn expand(&self, req: csi::NodeExpandVolumeRequest) -> Result<i64> {
        let id = required("volume_id", &req.volume_id)?;
        let path = PathBuf::from(required("volume_path", &req.volume_path)?);
        let _g = self.locks.try_lock(id)?;
        let _global = self.global().await;
        let s = self
            .state
            .get(id)?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} is not staged on this node")))?;
        if tokio::fs::metadata(&path).await.is_err() {
            return Err(CsiError::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let required = req
            .capacity_range
            .as_ref()
            .map_or(0, |r| u64::try_from(r.required_bytes).unwrap_or(0));
        // The chunks learn a ControllerExpand with their next heartbeat, so
        // right after it the LUN may still report the old capacity: rescan
        // until it shows the required size (bounded by the device timeout).
        let deadline = tokio::time::Instant::now() + self.cfg.device_timeout;
        let size = loop {
            self.rescan(&s.target).await?;
            let size = self
                .host
                .device_size(&s.device)
                .await
                .map_err(|e| host_err("device size", e))?;
            if size >= required {
                break size;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CsiError::OutOfRange(format!(
                    "device is {size} bytes, below required_bytes {required} after {:?} (expand the volume first)",
                    self.cfg.device_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        if s.access == "mount" {
            self.host
                .resize_fs(&s.device, &s.staging_path, &s.fs_type)
                .await
                .map_err(|e| host_err("grow filesystem", e))?;
        }
        info!(size, "expanded on the node");
        Ok(to_i64(size))
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        r: Request<csi::NodeStageVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeStageVolumeResponse>, Status> {
        answer(r, |q| self.stage(q), |()| Default::default()).await
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        answer(r, |q| self.unstage(q), |()| Default::default()).await
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodePublishVolumeResponse>, Status> {
        answer(r, |q| self.publish(q), |()| Default::default()).await
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        answer(r, |q| self.unpublish(q), |()| Default::default()).await
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> std::result::Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        answer(r, |q| self.stats(q), |v| v).await
    }

    async fn node_expand_volume(
        &self,
        r: Request<csi::NodeExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        answer(
            r,
            |q| self.expand(q),
            |capacity_bytes| csi::NodeExpandVolumeResponse { capacity_bytes },
        )
        .await
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let caps = [
            Cap::StageUnstageVolume,
            Cap::GetVolumeStats,
            Cap::ExpandVolume,
            Cap::VolumeCondition,
            Cap::SingleNodeMultiWriter,
        ];
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: caps
                .iter()
                .map(|c| csi::NodeServiceCapability {
                    r#type: Some(csi::node_service_capability::Type::Rpc(
                        csi::node_service_capability::Rpc { r#type: *c as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> std::result::Result<Response<csi::NodeGetInfoResponse>, Status> {
        // The node reaches every volume of its cluster (through the VIP):
        // its topology is the cluster segment.
        let accessible_topology = match &self.cfg.cluster {
            Some(c) => Some(crate::topology::segment(&c.get().await?)),
            None => None,
        };
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology,
        }))
    }
}

#[cfg(test)]
mod tests;
