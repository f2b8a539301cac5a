//! The Controller service over meta's gRPC API.
//!
//! Volume ids are meta's volume ids; snapshot ids meta's snapshot ids. CSI
//! names are the CO's idempotency keys and map to meta names with
//! [`crate::names::meta_name`]. A volume cloned from a volume goes through a
//! hidden snapshot named `_clone.<clone name>` (the `_` cannot appear
//! unescaped in a mapped name), deleted again with the clone when nothing
//! else uses it.

use std::collections::HashMap;
use std::time::Duration;

use ironblock_proto::csi;
use ironblock_proto::csi::controller_server::Controller;
use ironblock_proto::csi::controller_service_capability::rpc::Type as Cap;
use ironblock_proto::csi::volume_content_source::{SnapshotSource, Type as Source};
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use ironblock_proto::MetaChannel;
use tonic::{Code, Request, Response, Status};
use tracing::info;

use crate::error::{CsiError, Result};
use crate::keys;
use crate::locks::VolumeLocks;
use crate::names::{self, Access};
use crate::rpc::answer;
use crate::topology::{self, ClusterId};

/// Prefix of the hidden snapshots behind volume-to-volume clones.
const CLONE_SNAPSHOT_PREFIX: &str = "_clone.";

/// StorageClass parameters this driver reads. The replication factor is
/// also the one mutable parameter (VolumeAttributesClass parameters, passed
/// to CreateVolume and ControllerModifyVolume as `mutable_parameters`).
pub mod params {
    /// Replication factor, 1..=3 (alias `replicationFactor`); mutable.
    pub const REPLICAS: &str = "replicas";
    /// Alias of [`REPLICAS`].
    pub const REPLICATION_FACTOR: &str = "replicationFactor";
    /// "true" (default): extents placed on first write; "false": thick.
    pub const THIN: &str = "thin";
    /// Filesystem type (ext4, xfs); also `csi.storage.k8s.io/fstype`.
    pub const FS_TYPE: &str = "fsType";
    /// Keys with this prefix are the sidecars' own and ignored.
    pub const K8S_PREFIX: &str = "csi.storage.k8s.io/";
}

/// Controller settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The iSCSI portal initiators log in to (the VIP), put in the publish
    /// context.
    pub portal: Option<String>,
    /// Replication factor when the StorageClass does not say.
    pub default_replicas: u32,
    /// Bound on every meta call.
    pub call_timeout: Duration,
    /// The cluster id the operator expects (`--cluster-id`): meta's must
    /// be the same, else the calls that need it fail FAILED_PRECONDITION
    /// (and Probe fails). None: whatever meta says.
    pub cluster_id: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            portal: None,
            default_replicas: 2,
            call_timeout: Duration::from_secs(15),
            cluster_id: None,
        }
    }
}

/// The Controller service (cheap to clone: clones share the meta channel
/// and the locks).
#[derive(Clone)]
pub struct ControllerService {
    meta: MetaClient<MetaChannel>,
    cfg: ControllerConfig,
    locks: std::sync::Arc<VolumeLocks>,
    /// The cluster id (the volumes' topology segment), learned from meta.
    cluster: std::sync::Arc<ClusterId>,
}

struct Parsed {
    replicas: u32,
    thin: bool,
}

/// A replication factor parameter `k`=`v` (1..=3). `seen` is the factor an
/// earlier key of the same map gave: the two spellings must agree.
fn parse_replicas(k: &str, v: &str, seen: Option<u32>) -> Result<u32> {
    let r = v
        .parse()
        .ok()
        .filter(|r| (1..=3).contains(r))
        .ok_or_else(|| {
            CsiError::InvalidArgument(format!("parameter {k}={v:?}: expected 1, 2 or 3"))
        })?;
    match seen {
        Some(s) if s != r => Err(CsiError::InvalidArgument(format!(
            "parameters {} and {} disagree ({s} vs {r})",
            params::REPLICAS,
            params::REPLICATION_FACTOR
        ))),
        _ => Ok(r),
    }
}

/// The mutable parameters (a VolumeAttributesClass's): the replication
/// factor under either name, nothing else (INVALID_ARGUMENT). `None` when
/// `p` is empty.
fn parse_mutable(p: &HashMap<String, String>) -> Result<Option<u32>> {
    let mut replicas = None;
    for (k, v) in p {
        match k.as_str() {
            params::REPLICAS | params::REPLICATION_FACTOR => {
                replicas = Some(parse_replicas(k, v, replicas)?);
            }
            _ => {
                return Err(CsiError::InvalidArgument(format!(
                    "mutable parameter {k:?} is not supported (mutable: {}, {})",
                    params::REPLICAS,
                    params::REPLICATION_FACTOR
                )))
            }
        }
    }
    Ok(replicas)
}

/// Checks VolumeAttributesClass parameters as ControllerModifyVolume would
/// (INVALID_ARGUMENT for an unknown key, a bad value or none at all).
pub fn check_mutable_parameters(p: &HashMap<String, String>) -> Result<()> {
    parse_mutable(p)?
        .map(|_| ())
        .ok_or_else(|| CsiError::InvalidArgument("mutable_parameters is required".into()))
}

fn parse_params(p: &HashMap<String, String>, default_replicas: u32) -> Result<Parsed> {
    let mut out = Parsed {
        replicas: default_replicas,
        thin: true,
    };
    let mut replicas = None;
    for (k, v) in p {
        match k.as_str() {
            params::REPLICAS | params::REPLICATION_FACTOR => {
                let r = parse_replicas(k, v, replicas)?;
                replicas = Some(r);
                out.replicas = r;
            }
            params::THIN => {
                out.thin = v.parse().map_err(|_| {
                    CsiError::InvalidArgument(format!(
                        "parameter {k}={v:?}: expected true or false"
                    ))
                })?;
            }
            params::FS_TYPE => check_fs(k, v)?,
            _ if k.eq_ignore_ascii_case("csi.storage.k8s.io/fstype") => check_fs(k, v)?,
            _ if k.starts_with(params::K8S_PREFIX) => {}
            _ => {
                return Err(CsiError::InvalidArgument(format!(
                    "unknown parameter {k:?} (known: replicas, replicationFactor, thin, fsType)"
                )))
            }
        }
    }
    Ok(out)
}

/// Checks StorageClass parameters as CreateVolume would (INVALID_ARGUMENT
/// for an unknown key or a bad value).
pub fn check_parameters(p: &HashMap<String, String>) -> Result<()> {
    parse_params(p, 1).map(|_| ())
}

fn check_fs(k: &str, v: &str) -> Result<()> {
    if v.is_empty() || names::SUPPORTED_FS.contains(&v) {
        Ok(())
    } else {
        Err(CsiError::InvalidArgument(format!(
            "parameter {k}={v:?}: supported filesystems are ext4 and xfs"
        )))
    }
}

fn required<'a>(what: &str, v: &'a str) -> Result<&'a str> {
    if v.is_empty() {
        Err(CsiError::InvalidArgument(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn timestamp(unix_ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: to_i64(unix_ms / 1000),
        nanos: ((unix_ms % 1000) * 1_000_000) as i32,
    }
}

fn csi_snapshot(s: &pb::Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: to_i64(s.size_bytes),
        snapshot_id: s.id.clone(),
        source_volume_id: s.volume_id.clone(),
        creation_time: Some(timestamp(s.created_at_unix_ms)),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// A client of meta at `meta_addr` ("host:port" or a URL), connecting
/// lazily, every call bounded by `timeout`.
pub fn meta_client(meta_addr: &str, timeout: Duration) -> Result<MetaClient<MetaChannel>> {
    let connect = timeout.min(Duration::from_secs(1));
    let ch = MetaChannel::new(meta_addr, timeout, move |e| {
        e.connect_timeout(connect).timeout(timeout)
    })
    .map_err(|e| CsiError::InvalidArgument(format!("meta address {:?}: {}", e.addr, e.reason)))?;
    Ok(MetaClient::new(ch))
}

impl ControllerService {
    /// A controller talking to meta at `meta_addr` ("host:port" or a URL);
    /// connects lazily.
    pub fn new(meta_addr: &str, cfg: ControllerConfig) -> Result<ControllerService> {
        let meta = meta_client(meta_addr, cfg.call_timeout)?;
        let cluster = ClusterId::new(cfg.cluster_id.as_deref(), Some(meta.clone()))?;
        Ok(ControllerService {
            meta,
            cfg,
            locks: VolumeLocks::new(),
            cluster: std::sync::Arc::new(cluster),
        })
    }

    /// This cluster's id (the topology segment of every volume).
    pub async fn cluster_id(&self) -> Result<String> {
        self.cluster.get().await
    }

    /// Where the cluster id comes from (shared with a node service in the
    /// same process).
    pub fn cluster(&self) -> std::sync::Arc<ClusterId> {
        self.cluster.clone()
    }

    fn meta(&self) -> MetaClient<MetaChannel> {
        self.meta.clone()
    }

    /// Meta's cluster status, and its cluster id the configured one
    /// (Probe).
    pub async fn health(&self) -> std::result::Result<(), String> {
        self.meta()
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .map_err(|s| format!("meta: {}", s.message()))?;
        self.cluster_id()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn volume(&self, r: pb::volume_ref::Ref) -> Result<Option<pb::Volume>> {
        if let pb::volume_ref::Ref::Id(id) = &r {
            if !names::is_uuid(id) {
                return Ok(None);
            }
        }
        match self
            .meta()
            .get_volume(pb::VolumeRef { r#ref: Some(r) })
            .await
        {
            Ok(v) => Ok(v.into_inner().volume),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(CsiError::from_meta("get volume", &s)),
        }
    }

    async fn volume_by_id(&self, id: &str) -> Result<Option<pb::Volume>> {
        self.volume(pb::volume_ref::Ref::Id(id.to_string())).await
    }

    async fn snapshots(&self, volume_id: &str) -> Result<Vec<pb::Snapshot>> {
        match self
            .meta()
            .list_snapshots(pb::ListSnapshotsRequest {
                volume_id: volume_id.to_string(),
            })
            .await
        {
            Ok(r) => Ok(r.into_inner().snapshots),
            Err(s) if s.code() == Code::NotFound || s.code() == Code::InvalidArgument => {
                Ok(Vec::new())
            }
            Err(s) => Err(CsiError::from_meta("list snapshots", &s)),
        }
    }

    async fn snapshot(&self, id: &str) -> Result<Option<pb::Snapshot>> {
        if !names::is_uuid(id) {
            return Ok(None);
        }
        Ok(self
            .snapshots("")
            .await?
            .into_iter()
            .find(|s| s.id.eq_ignore_ascii_case(id)))
    }

    fn volume_context(&self, v: &pb::Volume) -> HashMap<String, String> {
        let mut c = HashMap::new();
        c.insert(keys::TARGET.to_string(), v.target_iqn.clone());
        c.insert(keys::LUN.to_string(), v.lun.to_string());
        c.insert(keys::SERIAL.to_string(), v.vpd_serial.clone());
        c.insert(keys::REPLICAS.to_string(), v.replicas.to_string());
        if let Some(p) = &self.cfg.portal {
            c.insert(keys::PORTAL.to_string(), p.clone());
        }
        c
    }

    /// The CSI view of a meta volume; `cluster` is this cluster's id (the
    /// volume is accessible from its nodes only).
    fn csi_volume(
        &self,
        v: &pb::Volume,
        source: Option<csi::VolumeContentSource>,
        cluster: &str,
    ) -> csi::Volume {
        let source = source.or_else(|| {
            (!v.parent_snapshot_id.is_empty()).then(|| csi::VolumeContentSource {
                r#type: Some(Source::Snapshot(SnapshotSource {
                    snapshot_id: v.parent_snapshot_id.clone(),
                })),
            })
        });
        csi::Volume {
            capacity_bytes: to_i64(v.size_bytes),
            volume_id: v.id.clone(),
            volume_context: self.volume_context(v),
            content_source: source,
            accessible_topology: vec![topology::segment(cluster)],
        }
    }

    async fn create_volume_inner(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume> {
        let name = names::meta_name(&req.name)?;
        names::check_capabilities(&req.volume_capabilities)?;
        let mut p = parse_params(&req.parameters, self.cfg.default_replicas)?;
        // A VolumeAttributesClass's parameters take precedence (spec).
        if let Some(r) = parse_mutable(&req.mutable_parameters)? {
            p.replicas = r;
        }
        let cluster = self.cluster_id().await?;
        // Requisite topologies of another cluster: no volume of this one
        // can meet them (see topology::unsatisfiable).
        let unreachable =
            topology::unsatisfiable(req.accessibility_requirements.as_ref(), &cluster);
        let _g = self.locks.try_lock(&format!("name/{name}"))?;
        let range = req.capacity_range.as_ref();
        let source = req.volume_content_source.clone().and_then(|s| s.r#type);
        // The source and the smallest size it allows.
        let (min, snap_src, vol_src) = match &source {
            None => (0, None, None),
            Some(Source::Snapshot(s)) => {
                let snap = self.snapshot(&s.snapshot_id).await?.ok_or_else(|| {
                    CsiError::NotFound(format!("source snapshot {:?} not found", s.snapshot_id))
                })?;
                (snap.size_bytes, Some(snap), None)
            }
            Some(Source::Volume(s)) => {
                let v = self.volume_by_id(&s.volume_id).await?.ok_or_else(|| {
                    CsiError::NotFound(format!("source volume {:?} not found", s.volume_id))
                })?;
                (v.size_bytes, None, Some(v))
            }
        };
        let size = names::size_for(range, min)?;
        if let Some(v) = self.volume(pb::volume_ref::Ref::Name(name.clone())).await? {
            let same_source = match (&snap_src, &vol_src) {
                (None, None) => v.parent_snapshot_id.is_empty(),
                (Some(s), _) => v.parent_snapshot_id == s.id,
                (_, Some(src)) => self.snapshots(&src.id).await?.iter().any(|s| {
                    s.id == v.parent_snapshot_id && s.name.starts_with(CLONE_SNAPSHOT_PREFIX)
                }),
            };
            if names::size_fits(v.size_bytes, range)
                && v.size_bytes >= min
                && v.replicas == p.replicas
                && v.thin == p.thin
                && same_source
                && unreachable.is_none()
            {
                return Ok(self.csi_volume(&v, req.volume_content_source, &cluster));
            }
            // Spec: an existing volume incompatible with the
            // accessibility_requirements is ALREADY_EXISTS too.
            return Err(CsiError::AlreadyExists(format!(
                "volume {:?} exists with size {}, replicas {}, thin {}, source {:?}, topology {}={cluster}",
                req.name, v.size_bytes, v.replicas, v.thin, v.parent_snapshot_id,
                topology::CLUSTER_KEY
            )));
        }
        if let Some(why) = unreachable {
            // Spec: "Unable to provision in accessible_topology".
            return Err(CsiError::ResourceExhausted(why));
        }
        let mut meta = self.meta();
        let created = match (&snap_src, &vol_src) {
            (None, None) => meta
                .create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    size_bytes: size,
                    replicas: p.replicas,
                    thin: p.thin,
                })
                .await
                .map_err(|s| CsiError::from_meta("create volume", &s))?,
            (Some(s), _) => meta
                .clone_volume(pb::CloneVolumeRequest {
                    snapshot_id: s.id.clone(),
                    name: name.clone(),
                    size_bytes: size,
                    replicas: p.replicas,
                    thin: p.thin,
                })
                .await
                .map_err(|s| CsiError::from_meta("create volume from snapshot", &s))?,
            (_, Some(src)) => {
                let snap = meta
                    .create_snapshot(pb::CreateSnapshotRequest {
                        volume_id: src.id.clone(),
                        name: format!("{CLONE_SNAPSHOT_PREFIX}{name}"),
                    })
                    .await
                    .map_err(|s| CsiError::from_meta("snapshot the source volume", &s))?
                    .into_inner()
                    .snapshot
                    .ok_or_else(|| CsiError::Internal("meta returned no snapshot".into()))?;
                match meta
                    .clone_volume(pb::CloneVolumeRequest {
                        snapshot_id: snap.id.clone(),
                        name: name.clone(),
                        size_bytes: size,
                        replicas: p.replicas,
                        thin: p.thin,
                    })
                    .await
                {
                    Ok(v) => v,
                    Err(s) => {
                        // Do not leave the hidden snapshot behind: it would
                        // keep the source volume from being deleted.
                        let _ = meta
                            .delete_snapshot(pb::DeleteSnapshotRequest {
                                snapshot_id: snap.id,
                            })
                            .await;
                        return Err(CsiError::from_meta("clone the source volume", &s));
                    }
                }
            }
        };
        let v = created
            .into_inner()
            .volume
            .ok_or_else(|| CsiError::Internal("meta returned no volume".into()))?;
        info!(volume = %v.id, name = %req.name, size, replicas = p.replicas, "created volume");
        Ok(self.csi_volume(&v, req.volume_content_source, &cluster))
    }

    async fn delete_volume_inner(&self, id: &str) -> Result<()> {
        required("volume_id", id)?;
        let _g = self.locks.try_lock(id)?;
        let Some(v) = self.volume_by_id(id).await? else {
            return Ok(());
        };
        if !v.acl.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is still published to {:?}",
                v.acl
            )));
        }
        let mut meta = self.meta();
        meta.delete_volume(pb::VolumeRef {
            r#ref: Some(pb::volume_ref::Ref::Id(v.id.clone())),
        })
        .await
        .map_err(|s| CsiError::from_meta("delete volume", &s))?;
        // The hidden snapshot of a volume-to-volume clone goes with it
        // (meta refuses while other clones use it; that is fine).
        if !v.parent_snapshot_id.is_empty() {
            if let Some(s) = self.snapshot(&v.parent_snapshot_id).await? {
                if s.name.starts_with(CLONE_SNAPSHOT_PREFIX) {
                    let _ = meta
                        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: s.id })
                        .await;
                }
            }
        }
        info!(volume = %id, "deleted volume");
        Ok(())
    }

    async fn publish_inner(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<HashMap<String, String>> {
        let id = required("volume_id", &req.volume_id)?;
        let node = required("node_id", &req.node_id)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        let (_, mode) = names::check_capability(cap)?;
        let v = self
            .volume_by_id(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} not found")))?;
        if !names::is_iscsi_name(node) {
            return Err(CsiError::NotFound(format!(
                "node {node:?} not found (node ids are initiator IQNs)"
            )));
        }
        let _g = self.locks.try_lock(id)?;
        // Spec: published to this node already, but with the other readonly
        // flag -> ALREADY_EXISTS (meta answers the same for a race).
        let read_only = req.readonly || names::reader_only(mode);
        if v.acl.iter().any(|a| a.eq_ignore_ascii_case(node)) {
            let was = v.acl_read_only.iter().any(|a| a.eq_ignore_ascii_case(node));
            if was != read_only {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} is published to node {node} {}, not {}",
                    if was { "read-only" } else { "read-write" },
                    if read_only { "read-only" } else { "read-write" },
                )));
            }
        }
        let others: Vec<&String> = v
            .acl
            .iter()
            .filter(|a| !a.eq_ignore_ascii_case(node))
            .collect();
        if !names::multi_node(mode) && !others.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is published to another node ({others:?}) and the access mode {} is single-node",
                mode.as_str_name()
            )));
        }
        self.meta()
            .acl_add(pb::AclRequest {
                volume_id: v.id.clone(),
                initiator_iqn: node.to_string(),
                read_only,
                change_mode: false,
            })
            .await
            .map_err(|s| CsiError::from_meta("add the node to the LUN ACL", &s))?;
        let mut ctx = self.volume_context(&v);
        ctx.insert(keys::NAA.to_string(), hex(&v.naa_id));
        if read_only {
            ctx.insert(keys::READ_ONLY.to_string(), "true".to_string());
        }
        info!(volume = %id, node, read_only, "published");
        Ok(ctx)
    }

    async fn unpublish_inner(&self, req: csi::ControllerUnpublishVolumeRequest) -> Result<()> {
        let id = required("volume_id", &req.volume_id)?;
        let _g = self.locks.try_lock(id)?;
        // Spec: a volume or node the plugin cannot find is unpublished.
        let Some(v) = self.volume_by_id(id).await? else {
            return Ok(());
        };
        let nodes: Vec<String> = if req.node_id.is_empty() {
            v.acl.clone()
        } else {
            v.acl
                .iter()
                .filter(|a| a.eq_ignore_ascii_case(&req.node_id))
                .cloned()
                .collect()
        };
        for n in nodes {
            match self
                .meta()
                .acl_remove(pb::AclRequest {
                    volume_id: v.id.clone(),
                    initiator_iqn: n.clone(),
                    ..Default::default()
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(CsiError::from_meta("remove the node from the LUN ACL", &s)),
            }
            info!(volume = %id, node = %n, "unpublished");
        }
        Ok(())
    }

    async fn list_volumes_inner(
        &self,
        req: csi::ListVolumesRequest,
    ) -> Result<csi::ListVolumesResponse> {
        let mut vols = self
            .meta()
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .map_err(|s| CsiError::from_meta("list volumes", &s))?
            .into_inner()
            .volumes;
        vols.sort_by(|a, b| a.id.cmp(&b.id));
        let ids: Vec<&str> = vols.iter().map(|v| v.id.as_str()).collect();
        let (range, next_token) = names::page_after(&ids, &req.starting_token, req.max_entries)?;
        let cluster = self.cluster_id().await?;
        let entries = vols[range]
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(self.csi_volume(v, None, &cluster)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: v.acl.clone(),
                    volume_condition: None,
                }),
            })
            .collect();
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn get_capacity_inner(
        &self,
        req: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse> {
        let zero = csi::GetCapacityResponse {
            available_capacity: 0,
            maximum_volume_size: Some(0),
            minimum_volume_size: Some(to_i64(names::BLOCK)),
        };
        if req
            .volume_capabilities
            .iter()
            .any(|c| names::check_capability(c).is_err())
        {
            return Ok(zero);
        }
        let Ok(p) = parse_params(&req.parameters, self.cfg.default_replicas) else {
            return Ok(zero);
        };
        // Another cluster's topology (or one naming no cluster): none of
        // this cluster's capacity is accessible from there.
        if let Some(t) = &req.accessible_topology {
            if !topology::reaches(t, &self.cluster_id().await?) {
                return Ok(zero);
            }
        }
        let chunks = self
            .meta()
            .list_chunks(pb::ListChunksRequest {})
            .await
            .map_err(|s| CsiError::from_meta("list chunks", &s))?
            .into_inner()
            .chunks;
        let alive: Vec<&pb::Chunk> = chunks
            .iter()
            .filter(|c| c.state == pb::ChunkState::Alive as i32)
            .collect();
        if alive.len() < p.replicas as usize {
            return Ok(zero);
        }
        let free: u64 = alive
            .iter()
            .map(|c| c.capacity_bytes.saturating_sub(c.used_bytes))
            .sum();
        let avail = free / u64::from(p.replicas.max(1)) / names::BLOCK * names::BLOCK;
        Ok(csi::GetCapacityResponse {
            available_capacity: to_i64(avail),
            maximum_volume_size: Some(to_i64(avail)),
            minimum_volume_size: Some(to_i64(names::BLOCK)),
        })
    }

    async fn create_snapshot_inner(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot> {
        let src = required("source_volume_id", &req.source_volume_id)?;
        let name = names::meta_name(&req.name)?;
        if !req.parameters.is_empty() {
            return Err(CsiError::InvalidArgument(format!(
                "snapshot parameters are not supported: {:?}",
                req.parameters.keys().collect::<Vec<_>>()
            )));
        }
        let _g = self.locks.try_lock(&format!("snapshot/{name}"))?;
        let v = self
            .volume_by_id(src)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("source volume {src} not found")))?;
        let s = self
            .meta()
            .create_snapshot(pb::CreateSnapshotRequest {
                volume_id: v.id.clone(),
                name,
            })
            .await
            .map_err(|s| CsiError::from_meta("create snapshot", &s))?
            .into_inner()
            .snapshot
            .ok_or_else(|| CsiError::Internal("meta returned no snapshot".into()))?;
        info!(volume = %v.id, snapshot = %s.id, "snapshot created");
        Ok(csi_snapshot(&s))
    }

    async fn delete_snapshot_inner(&self, id: &str) -> Result<()> {
        required("snapshot_id", id)?;
        if !names::is_uuid(id) {
            return Ok(());
        }
        let _g = self.locks.try_lock(&format!("snapshot-id/{id}"))?;
        match self
            .meta()
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: id.to_string(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(CsiError::from_meta("delete snapshot", &s)),
        }
    }

    async fn list_snapshots_inner(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse> {
        let mut snaps =
            if !req.source_volume_id.is_empty() && !names::is_uuid(&req.source_volume_id) {
                Vec::new()
            } else {
                self.snapshots(&req.source_volume_id).await?
            };
        snaps.retain(|s| {
            !s.name.starts_with(CLONE_SNAPSHOT_PREFIX)
                && (req.snapshot_id.is_empty() || s.id.eq_ignore_ascii_case(&req.snapshot_id))
                && (req.source_volume_id.is_empty()
                    || s.volume_id.eq_ignore_ascii_case(&req.source_volume_id))
        });
        snaps.sort_by(|a, b| a.id.cmp(&b.id));
        let ids: Vec<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
        let (range, next_token) = names::page_after(&ids, &req.starting_token, req.max_entries)?;
        Ok(csi::ListSnapshotsResponse {
            entries: snaps[range]
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(csi_snapshot(s)),
                })
                .collect(),
            next_token,
        })
    }

    async fn expand_inner(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        let id = required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("capacity_range is required".into()))?;
        let block = match &req.volume_capability {
            Some(c) => names::check_capability(c)?.0 == Access::Block,
            None => false,
        };
        let _g = self.locks.try_lock(id)?;
        let v = self
            .volume_by_id(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} not found")))?;
        let want = names::size_for(Some(range), 0)?;
        let size = if want <= v.size_bytes {
            if range.limit_bytes > 0 && v.size_bytes > range.limit_bytes as u64 {
                return Err(CsiError::OutOfRange(format!(
                    "volume {id} is already {} bytes, above limit_bytes {} (volumes do not shrink)",
                    v.size_bytes, range.limit_bytes
                )));
            }
            v.size_bytes
        } else {
            let r = self
                .meta()
                .resize_volume(pb::ResizeVolumeRequest {
                    volume: Some(pb::VolumeRef {
                        r#ref: Some(pb::volume_ref::Ref::Id(v.id.clone())),
                    }),
                    new_size_bytes: want,
                })
                .await
                .map_err(|s| match s.code() {
                    Code::ResourceExhausted | Code::InvalidArgument => {
                        CsiError::OutOfRange(format!("expand volume: {}", s.message()))
                    }
                    _ => CsiError::from_meta("expand volume", &s),
                })?
                .into_inner()
                .volume
                .ok_or_else(|| CsiError::Internal("meta returned no volume".into()))?;
            info!(volume = %id, from = v.size_bytes, to = r.size_bytes, "expanded");
            r.size_bytes
        };
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(size),
            node_expansion_required: !block,
        })
    }

    /// ControllerModifyVolume: the replication factor, the one mutable
    /// parameter. Returns once meta has the new factor: a raise is copied
    /// in the background (ControllerGetVolume's condition says "recovering"
    /// until done), a lower takes effect at once. Idempotent.
    async fn modify_inner(&self, req: csi::ControllerModifyVolumeRequest) -> Result<()> {
        let id = required("volume_id", &req.volume_id)?;
        let replicas = parse_mutable(&req.mutable_parameters)?.ok_or_else(|| {
            CsiError::InvalidArgument(format!(
                "mutable_parameters is required (mutable: {}, {})",
                params::REPLICAS,
                params::REPLICATION_FACTOR
            ))
        })?;
        let _g = self.locks.try_lock(id)?;
        let v = self
            .volume_by_id(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} not found")))?;
        if v.replicas == replicas {
            return Ok(());
        }
        self.meta()
            .set_volume_replicas(pb::SetVolumeReplicasRequest {
                volume: Some(pb::VolumeRef {
                    r#ref: Some(pb::volume_ref::Ref::Id(v.id.clone())),
                }),
                replicas,
            })
            .await
            .map_err(|s| CsiError::from_meta("set the replication factor", &s))?;
        info!(volume = %id, from = v.replicas, to = replicas, "replication factor changed");
        Ok(())
    }

    async fn validate_inner(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        let id = required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        let v = self
            .volume_by_id(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} not found")))?;
        // A volume context that is not this volume's (another LUN) is not
        // confirmed.
        let ours = self.volume_context(&v);
        let context_problem = [keys::TARGET, keys::LUN, keys::SERIAL]
            .iter()
            .find(|k| {
                req.volume_context
                    .get(**k)
                    .is_some_and(|x| ours.get(**k) != Some(x))
            })
            .map(|k| CsiError::InvalidArgument(format!("volume_context {k} is not this volume's")));
        // Parameters must parse and describe this volume; mutable ones (a
        // VolumeAttributesClass's) take precedence over the StorageClass's.
        let parsed = parse_params(&req.parameters, v.replicas).and_then(|mut p| {
            if let Some(r) = parse_mutable(&req.mutable_parameters)? {
                p.replicas = r;
            }
            Ok(p)
        });
        let param_problem = match parsed {
            Err(e) => Some(e),
            Ok(p) if p.replicas != v.replicas => Some(CsiError::InvalidArgument(format!(
                "volume has {} replicas, parameters ask for {}",
                v.replicas, p.replicas
            ))),
            Ok(p) if req.parameters.contains_key(params::THIN) && p.thin != v.thin => {
                Some(CsiError::InvalidArgument(format!(
                    "volume is {}, parameters ask otherwise",
                    if v.thin { "thin" } else { "thick" }
                )))
            }
            Ok(_) => None,
        };
        let problem = names::check_capabilities(&req.volume_capabilities)
            .err()
            .or(param_problem)
            .or(context_problem);
        Ok(match problem {
            Some(e) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
        })
    }

    async fn get_volume_inner(&self, id: &str) -> Result<csi::ControllerGetVolumeResponse> {
        required("volume_id", id)?;
        let v = self
            .volume_by_id(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} not found")))?;
        let extents = self
            .meta()
            .get_extents(pb::GetExtentsRequest {
                volume_id: v.id.clone(),
            })
            .await
            .map_err(|s| CsiError::from_meta("get extents", &s))?
            .into_inner()
            .extents;
        let lost = extents.iter().filter(|e| e.replicas.is_empty()).count();
        let degraded = extents.iter().filter(|e| e.degraded).count();
        let condition = if lost > 0 {
            csi::VolumeCondition {
                abnormal: true,
                message: format!("{lost} extent(s) have no live replica"),
            }
        } else if degraded > 0 {
            csi::VolumeCondition {
                abnormal: false,
                message: format!(
                    "{degraded} extent(s) below the replication factor {}, recovering",
                    v.replicas
                ),
            }
        } else {
            csi::VolumeCondition {
                abnormal: false,
                message: "healthy".into(),
            }
        };
        let cluster = self.cluster_id().await?;
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.csi_volume(&v, None, &cluster)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: v.acl.clone(),
                volume_condition: Some(condition),
            }),
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> std::result::Result<Response<csi::CreateVolumeResponse>, Status> {
        answer(
            r,
            |q| self.create_volume_inner(q),
            |v| csi::CreateVolumeResponse { volume: Some(v) },
        )
        .await
    }

    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> std::result::Result<Response<csi::DeleteVolumeResponse>, Status> {
        answer(
            r,
            |q| async move { self.delete_volume_inner(&q.volume_id).await },
            |()| Default::default(),
        )
        .await
    }

    async fn controller_publish_volume(
        &self,
        r: Request<csi::ControllerPublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        answer(
            r,
            |q| self.publish_inner(q),
            |publish_context| csi::ControllerPublishVolumeResponse { publish_context },
        )
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        answer(r, |q| self.unpublish_inner(q), |()| Default::default()).await
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        answer(r, |q| self.validate_inner(q), |v| v).await
    }

    async fn list_volumes(
        &self,
        r: Request<csi::ListVolumesRequest>,
    ) -> std::result::Result<Response<csi::ListVolumesResponse>, Status> {
        answer(r, |q| self.list_volumes_inner(q), |v| v).await
    }

    async fn get_capacity(
        &self,
        r: Request<csi::GetCapacityRequest>,
    ) -> std::result::Result<Response<csi::GetCapacityResponse>, Status> {
        answer(r, |q| self.get_capacity_inner(q), |v| v).await
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let caps = [
            Cap::CreateDeleteVolume,
            Cap::PublishUnpublishVolume,
            Cap::ListVolumes,
            Cap::GetCapacity,
            Cap::CreateDeleteSnapshot,
            Cap::ListSnapshots,
            Cap::CloneVolume,
            Cap::ExpandVolume,
            Cap::ListVolumesPublishedNodes,
            Cap::VolumeCondition,
            Cap::GetVolume,
            Cap::SingleNodeMultiWriter,
            Cap::ModifyVolume,
        ];
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: caps
                .iter()
                .map(|c| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(
                        csi::controller_service_capability::Rpc { r#type: *c as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<csi::CreateSnapshotRequest>,
    ) -> std::result::Result<Response<csi::CreateSnapshotResponse>, Status> {
        answer(
            r,
            |q| self.create_snapshot_inner(q),
            |s| csi::CreateSnapshotResponse { snapshot: Some(s) },
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        r: Request<csi::DeleteSnapshotRequest>,
    ) -> std::result::Result<Response<csi::DeleteSnapshotResponse>, Status> {
        answer(
            r,
            |q| async move { self.delete_snapshot_inner(&q.snapshot_id).await },
            |()| Default::default(),
        )
        .await
    }

    async fn list_snapshots(
        &self,
        r: Request<csi::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<csi::ListSnapshotsResponse>, Status> {
        answer(r, |q| self.list_snapshots_inner(q), |v| v).await
    }

    async fn controller_expand_volume(
        &self,
        r: Request<csi::ControllerExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        answer(r, |q| self.expand_inner(q), |v| v).await
    }

    async fn controller_get_volume(
        &self,
        r: Request<csi::ControllerGetVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        answer(
            r,
            |q| async move { self.get_volume_inner(&q.volume_id).await },
            |v| v,
        )
        .await
    }

    async fn controller_modify_volume(
        &self,
        r: Request<csi::ControllerModifyVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        answer(r, |q| self.modify_inner(q), |()| Default::default()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        let mut p = HashMap::new();
        assert_eq!(parse_params(&p, 2).unwrap().replicas, 2);
        p.insert("replicationFactor".to_string(), "3".to_string());
        p.insert("csi.storage.k8s.io/fstype".to_string(), "xfs".to_string());
        p.insert("csi.storage.k8s.io/pvc/name".to_string(), "x".to_string());
        let r = parse_params(&p, 2).unwrap();
        assert_eq!((r.replicas, r.thin), (3, true));
        p.insert("replicas".to_string(), "4".to_string());
        assert!(parse_params(&p, 2).is_err());
        let mut q = HashMap::new();
        q.insert("colour".to_string(), "red".to_string());
        assert!(parse_params(&q, 2).is_err());
        let mut f = HashMap::new();
        f.insert("fsType".to_string(), "ntfs".to_string());
        assert!(parse_params(&f, 2).is_err());
        // The two spellings of the factor must agree (a map has no order).
        let both = |a: &str, b: &str| {
            HashMap::from([
                ("replicas".to_string(), a.to_string()),
                ("replicationFactor".to_string(), b.to_string()),
            ])
        };
        assert_eq!(parse_params(&both("2", "2"), 1).unwrap().replicas, 2);
        assert_eq!(
            parse_params(&both("2", "3"), 1).err().map(|e| e.code()),
            Some(Code::InvalidArgument)
        );
    }

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn mutable_parameters() {
        assert_eq!(parse_mutable(&HashMap::new()).unwrap(), None);
        assert_eq!(parse_mutable(&map(&[("replicas", "2")])).unwrap(), Some(2));
        assert_eq!(
            parse_mutable(&map(&[("replicationFactor", "3")])).unwrap(),
            Some(3)
        );
        assert_eq!(
            parse_mutable(&map(&[("replicas", "1"), ("replicationFactor", "1")])).unwrap(),
            Some(1)
        );
        for bad in [
            map(&[("replicas", "0")]),
            map(&[("replicas", "4")]),
            map(&[("replicationFactor", "two")]),
            map(&[("replicas", "1"), ("replicationFactor", "2")]),
            // Only the factor is mutable: the StorageClass's other keys and
            // the sidecars' prefixed ones are not.
            map(&[("replicas", "2"), ("thin", "false")]),
            map(&[("fsType", "xfs")]),
            map(&[("csi.storage.k8s.io/fstype", "xfs")]),
            map(&[("iops", "100")]),
        ] {
            assert_eq!(
                parse_mutable(&bad).err().map(|e| e.code()),
                Some(Code::InvalidArgument),
                "{bad:?}"
            );
        }
        assert!(check_mutable_parameters(&map(&[("replicas", "3")])).is_ok());
        assert_eq!(
            check_mutable_parameters(&HashMap::new())
                .err()
                .map(|e| e.code()),
            Some(Code::InvalidArgument)
        );
    }

    /// A meta server in this process with `chunks` registered chunks that
    /// stay alive for the test (a minute of liveness) and acknowledge every
    /// revision in heartbeats (meta's calls wait until a change is in
    /// force on them), and a controller over it.
    struct Rig {
        meta: MetaClient<MetaChannel>,
        ctl: ControllerService,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        beats: Vec<tokio::task::JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    /// A chunk's heartbeats every 20 ms, each reporting the revision the
    /// previous answer announced as applied. Ends on the first error.
    fn heartbeats(
        mut meta: MetaClient<MetaChannel>,
        cluster_id: String,
        chunk_id: u64,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut applied = 0;
            loop {
                let Ok(r) = meta
                    .heartbeat(pb::HeartbeatRequest {
                        cluster_id: cluster_id.clone(),
                        chunk_id,
                        applied_revision: applied,
                        ..Default::default()
                    })
                    .await
                else {
                    return;
                };
                applied = r.into_inner().revision;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    impl Rig {
        async fn start(chunks: u8) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let mut config = ironblock_meta::Config::new(
                "127.0.0.1:0".parse().unwrap(),
                dir.path().to_path_buf(),
            );
            config.liveness_timeout = Duration::from_secs(60);
            let server = ironblock_meta::MetaServer::bind(config).await.unwrap();
            let addr = server.local_addr().unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                let _ = server
                    .run(async {
                        let _ = rx.await;
                    })
                    .await;
            });
            let mut meta = meta_client(&addr.to_string(), Duration::from_secs(10)).unwrap();
            let mut beats = Vec::new();
            for n in 1..=chunks {
                let r = meta
                    .register_chunk(pb::RegisterChunkRequest {
                        portal: format!("127.0.0.{n}:3260"),
                        data_addr: format!("127.0.0.{n}:7100"),
                        capacity_bytes: 100 << 30,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                beats.push(heartbeats(meta.clone(), r.cluster_id, r.chunk_id));
            }
            let ctl = ControllerService::new(
                &addr.to_string(),
                ControllerConfig {
                    call_timeout: Duration::from_secs(5),
                    ..Default::default()
                },
            )
            .unwrap();
            Rig {
                meta,
                ctl,
                stop: Some(tx),
                beats,
                _dir: dir,
            }
        }

        async fn create(&self, name: &str, replicas: &str) -> csi::Volume {
            let req = csi::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 128 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![csi::VolumeCapability {
                    access_type: Some(
                        csi::volume_capability::AccessType::Block(Default::default()),
                    ),
                    access_mode: Some(csi::volume_capability::AccessMode {
                        mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                    }),
                }],
                parameters: map(&[("replicas", replicas), ("thin", "false")]),
                ..Default::default()
            };
            self.ctl.create_volume_inner(req).await.unwrap()
        }

        async fn modify(&self, id: &str, kv: &[(&str, &str)]) -> Result<()> {
            self.ctl
                .modify_inner(csi::ControllerModifyVolumeRequest {
                    volume_id: id.into(),
                    mutable_parameters: map(kv),
                    ..Default::default()
                })
                .await
        }

        async fn replicas(&mut self, id: &str) -> (u32, Vec<pb::Extent>) {
            let v = self
                .meta
                .get_volume(pb::VolumeRef {
                    r#ref: Some(pb::volume_ref::Ref::Id(id.into())),
                })
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            let e = self
                .meta
                .get_extents(pb::GetExtentsRequest {
                    volume_id: id.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .extents;
            (v.replicas, e)
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            for b in &self.beats {
                b.abort();
            }
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
        }
    }

    #[tokio::test]
    async fn modify_volume_changes_the_replication_factor() {
        let mut rig = Rig::start(3).await;
        let v = rig.create("pvc-a", "1").await;
        let id = v.volume_id.clone();

        // Raise: meta has the factor, the extents recover in the background
        // and GetVolume says so.
        rig.modify(&id, &[("replicas", "3")]).await.unwrap();
        let (rf, ext) = rig.replicas(&id).await;
        assert_eq!(rf, 3);
        assert!(ext.iter().all(|e| e.degraded && e.replication_factor == 3));
        let cond = rig
            .ctl
            .get_volume_inner(&id)
            .await
            .unwrap()
            .status
            .unwrap()
            .volume_condition
            .unwrap();
        assert!(!cond.abnormal);
        assert!(cond.message.contains("recovering"), "{}", cond.message);
        // Idempotent, under either name.
        let rev = |m: &mut MetaClient<MetaChannel>| {
            let mut m = m.clone();
            async move {
                m.cluster_status(pb::ClusterStatusRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .revision
            }
        };
        let before = rev(&mut rig.meta).await;
        rig.modify(&id, &[("replicationFactor", "3")])
            .await
            .unwrap();
        assert_eq!(rev(&mut rig.meta).await, before, "nothing changed");

        // Lower: the surplus goes at once.
        rig.modify(&id, &[("replicas", "1")]).await.unwrap();
        let (rf, ext) = rig.replicas(&id).await;
        assert_eq!(rf, 1);
        assert!(ext
            .iter()
            .all(|e| e.replicas.len() == 1 && e.learners.is_empty() && !e.degraded));

        // Refused: nothing changes.
        let code = |r: Result<()>| r.err().map(|e| e.code());
        assert_eq!(
            code(rig.modify(&id, &[("replicas", "4")]).await),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(rig.modify(&id, &[("thin", "true")]).await),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(rig.modify(&id, &[]).await),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(rig.modify("", &[("replicas", "2")]).await),
            Some(Code::InvalidArgument)
        );
        for unknown in ["00000000-0000-4000-8000-000000000000", "not-an-id"] {
            assert_eq!(
                code(rig.modify(unknown, &[("replicas", "2")]).await),
                Some(Code::NotFound),
                "{unknown}"
            );
        }
        // A volume with an operation in flight is ABORTED before meta is
        // asked; once the lock is free the same call goes through.
        let guard = rig.ctl.locks.try_lock(&id).unwrap();
        assert_eq!(
            code(rig.modify(&id, &[("replicas", "2")]).await),
            Some(Code::Aborted)
        );
        drop(guard);
        assert_eq!(rig.replicas(&id).await.0, 1);
        rig.modify(&id, &[("replicas", "2")]).await.unwrap();
        assert_eq!(rig.replicas(&id).await.0, 2);
    }

    #[tokio::test]
    async fn meta_refusals_pass_through_and_create_takes_mutable_parameters() {
        let mut rig = Rig::start(2).await;
        let v = rig.create("pvc-b", "1").await;
        // Two chunks cannot hold three replicas.
        let e = rig
            .modify(&v.volume_id, &[("replicas", "3")])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert_eq!(rig.replicas(&v.volume_id).await.0, 1);

        // CreateVolume: a VolumeAttributesClass's factor wins over the
        // StorageClass's; an unknown mutable key is refused.
        let mut req = csi::CreateVolumeRequest {
            name: "pvc-c".into(),
            volume_capabilities: vec![csi::VolumeCapability {
                access_type: Some(csi::volume_capability::AccessType::Block(Default::default())),
                access_mode: Some(csi::volume_capability::AccessMode {
                    mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }],
            parameters: map(&[("replicas", "1")]),
            mutable_parameters: map(&[("iops", "5")]),
            ..Default::default()
        };
        assert_eq!(
            rig.ctl
                .create_volume_inner(req.clone())
                .await
                .err()
                .map(|e| e.code()),
            Some(Code::InvalidArgument)
        );
        req.mutable_parameters = map(&[("replicationFactor", "2")]);
        let c = rig.ctl.create_volume_inner(req.clone()).await.unwrap();
        assert_eq!(rig.replicas(&c.volume_id).await.0, 2);
        // Idempotent with the same request.
        let again = rig.ctl.create_volume_inner(req).await.unwrap();
        assert_eq!(again.volume_id, c.volume_id);
    }

    #[tokio::test]
    async fn modify_volume_is_advertised() {
        let ctl = ControllerService::new("127.0.0.1:1", ControllerConfig::default()).unwrap();
        let caps = ctl
            .controller_get_capabilities(Request::new(csi::ControllerGetCapabilitiesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .capabilities;
        assert!(caps.iter().any(|c| matches!(
            &c.r#type,
            Some(csi::controller_service_capability::Type::Rpc(r)) if r.r#type == Cap::ModifyVolume as i32
        )));
    }
}
