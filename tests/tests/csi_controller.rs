//! CSI conformance of the Identity and Controller services, written from the
//! CSI spec (v1.9): the `ironblock-csi` binary in controller mode on a unix
//! socket, driven over gRPC, against a real cluster (meta + 2 chunk
//! processes). Every controller call, its idempotency, and each error code
//! the spec lists for it (ControllerModifyVolume: the replication factor as
//! the one mutable parameter, ABORTED while a modify is in flight).
//! Topology (VOLUME_ACCESSIBILITY_CONSTRAINTS): every
//! volume is accessible from the cluster segment
//! `topology.ironblock.io/cluster=<meta's cluster id>`, which a node plugin
//! learns from meta; requisite topologies of another cluster are
//! RESOURCE_EXHAUSTED, GetCapacity for them is 0, a controller configured
//! with another cluster id than its meta's refuses to work.
//!
//! `csi_node_api` drives the Node service of a `--mode node` process (set
//! up by environment variables, as the DaemonSet does) over its socket for
//! everything that needs no initiator: NodeGetInfo, capabilities, argument
//! errors, FAILED_PRECONDITION / NOT_FOUND on unstaged volumes, idempotent
//! teardown. Staging against the real Linux initiator (QEMU guest) is not
//! here; the staging logic is tested with a fake initiator in
//! `csi/src/node/tests.rs`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ironblock_proto::csi;
use ironblock_proto::csi::controller_client::ControllerClient;
use ironblock_proto::csi::controller_service_capability::rpc::Type as Cap;
use ironblock_proto::csi::identity_client::IdentityClient;
use ironblock_proto::csi::volume_capability::access_mode::Mode;
use ironblock_proto::csi::volume_capability::AccessMode;
use ironblock_proto::csi::volume_content_source::{SnapshotSource, Type as Source, VolumeSource};
use ironblock_proto::v1 as pb;
use ironblock_tests::cluster::{start_chunks, Admin, MetaProcess};
use ironblock_tests::csi::{capability, CsiProcess};
use ironblock_tests::scratch_dir;
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;
const NODE1: &str = "iqn.2026-11.dev.ironblock.node:n1";
const NODE2: &str = "iqn.2026-11.dev.ironblock.node:n2";
const PORTAL: &str = "127.0.0.100:3260";
/// The cluster id the meta-less node plugin of `csi_node_api` is given (in
/// upper case: reported canonical).
const NODE_CLUSTER: &str = "0F1E2D3C-4B5A-4697-8877-665544332211";

type Ctl = ControllerClient<Channel>;

/// A request spoilt by the function, and the code it is refused with.
type Refused<R> = (&'static str, fn(&mut R), Code);

fn cap(access: &str, mode: Mode) -> csi::VolumeCapability {
    capability(access, mode)
}

fn rwo() -> csi::VolumeCapability {
    cap("ext4", Mode::SingleNodeWriter)
}

fn range(req: i64, lim: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: req,
        limit_bytes: lim,
    })
}

fn params(replicas: &str) -> HashMap<String, String> {
    HashMap::from([("replicas".to_string(), replicas.to_string())])
}

fn create_req(name: &str, size: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![rwo()],
        parameters: params("1"),
        ..Default::default()
    }
}

#[track_caller]
fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

async fn create(c: &mut Ctl, req: csi::CreateVolumeRequest) -> csi::Volume {
    c.create_volume(req)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
}

async fn publish(
    c: &mut Ctl,
    id: &str,
    node: &str,
    cap: csi::VolumeCapability,
) -> Result<HashMap<String, String>, tonic::Status> {
    publish_ro(c, id, node, cap, false).await
}

async fn publish_ro(
    c: &mut Ctl,
    id: &str,
    node: &str,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> Result<HashMap<String, String>, tonic::Status> {
    c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().publish_context)
}

/// Meta's ACL of a volume: (all initiators, the read-only ones).
async fn meta_acl_modes(admin: &mut Admin, id: &str) -> (Vec<String>, Vec<String>) {
    let v = admin
        .client()
        .get_volume(pb::VolumeRef {
            r#ref: Some(pb::volume_ref::Ref::Id(id.into())),
        })
        .await
        .expect("meta GetVolume")
        .into_inner()
        .volume
        .expect("volume");
    (v.acl, v.acl_read_only)
}

async fn unpublish(c: &mut Ctl, id: &str, node: &str) -> Result<(), tonic::Status> {
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn delete(c: &mut Ctl, id: &str) -> Result<(), tonic::Status> {
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn meta_acl(admin: &mut Admin, id: &str) -> Vec<String> {
    meta_acl_modes(admin, id).await.0
}

async fn snapshot(c: &mut Ctl, vol: &str, name: &str) -> Result<csi::Snapshot, tonic::Status> {
    c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: vol.into(),
        name: name.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().snapshot.expect("snapshot"))
}

async fn delete_snapshot(c: &mut Ctl, id: &str) -> Result<(), tonic::Status> {
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn list_snapshots(c: &mut Ctl, r: csi::ListSnapshotsRequest) -> csi::ListSnapshotsResponse {
    c.list_snapshots(r)
        .await
        .expect("ListSnapshots")
        .into_inner()
}

async fn get_volume(
    c: &mut Ctl,
    id: &str,
) -> Result<csi::ControllerGetVolumeResponse, tonic::Status> {
    c.controller_get_volume(csi::ControllerGetVolumeRequest {
        volume_id: id.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn capacity(c: &mut Ctl, replicas: &str) -> csi::GetCapacityResponse {
    c.get_capacity(csi::GetCapacityRequest {
        parameters: params(replicas),
        ..Default::default()
    })
    .await
    .expect("GetCapacity")
    .into_inner()
}

fn list_volumes_req(max_entries: i32, starting_token: &str) -> csi::ListVolumesRequest {
    csi::ListVolumesRequest {
        max_entries,
        starting_token: starting_token.into(),
    }
}

/// A content source: the snapshot `id`.
fn from_snapshot(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(Source::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })),
    })
}

/// A content source: the volume `id`.
fn from_volume(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(Source::Volume(VolumeSource {
            volume_id: id.into(),
        })),
    })
}

async fn plugin_capabilities(id: &mut IdentityClient<Channel>) -> Vec<csi::PluginCapability> {
    id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .expect("GetPluginCapabilities")
        .into_inner()
        .capabilities
}

fn has_topology(caps: &[csi::PluginCapability]) -> bool {
    use csi::plugin_capability::{service, Type};
    caps.iter().any(|c| {
        matches!(&c.r#type, Some(Type::Service(s))
            if s.r#type == service::Type::VolumeAccessibilityConstraints as i32)
    })
}

const TOPOLOGY_KEY: &str = "topology.ironblock.io/cluster";

/// A topology of the given (key, value) segments.
fn topo(pairs: &[(&str, &str)]) -> csi::Topology {
    csi::Topology {
        segments: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// CreateVolume with accessibility requirements.
fn create_in(
    name: &str,
    requisite: Vec<csi::Topology>,
    preferred: Vec<csi::Topology>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite,
            preferred,
        }),
        ..create_req(name, 4 * MIB)
    }
}

/// GetCapacity for one replica, from `t`.
async fn capacity_from(c: &mut Ctl, t: Option<csi::Topology>) -> i64 {
    c.get_capacity(csi::GetCapacityRequest {
        parameters: params("1"),
        accessible_topology: t,
        ..Default::default()
    })
    .await
    .expect("GetCapacity")
    .into_inner()
    .available_capacity
}

fn offers_the_controller(caps: &[csi::PluginCapability]) -> bool {
    use csi::plugin_capability::{service, Type};
    caps.iter().any(|c| {
        matches!(&c.r#type, Some(Type::Service(s))
            if s.r#type == service::Type::ControllerService as i32)
    })
}

async fn list_all_volumes(c: &mut Ctl, page: i32) -> Vec<csi::list_volumes_response::Entry> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_volumes(list_volumes_req(page, &token))
            .await
            .expect("ListVolumes")
            .into_inner();
        if page > 0 {
            assert!(
                r.entries.len() <= page as usize,
                "page larger than max_entries"
            );
        }
        out.extend(r.entries);
        if r.next_token.is_empty() {
            return out;
        }
        token = r.next_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_controller_conformance() {
    let t0 = Instant::now();
    let dir = scratch_dir("csi-controller-");
    let meta = MetaProcess::start(dir.path(), Duration::from_secs(3));
    let chunks = start_chunks(&meta, dir.path(), 2);
    let mut admin = meta.admin().await;
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], ironblock_tests::free_port()).into();
    let drv = CsiProcess::start(
        &dir.path().join("csi"),
        "controller",
        &[
            "--meta",
            &meta.addr().to_string(),
            "--portal",
            PORTAL,
            "--metrics",
            &metrics.to_string(),
        ],
    );
    println!("cluster up in {:?}", t0.elapsed());

    // ---------------------------------------------------------- identity
    let mut id = drv.identity().await;
    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.ironblock.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = plugin_capabilities(&mut id).await;
    use csi::plugin_capability::{volume_expansion, Type as PT};
    assert!(offers_the_controller(&caps));
    assert!(caps.iter().any(|c| matches!(&c.r#type, Some(PT::VolumeExpansion(e)) if e.r#type == volume_expansion::Type::Online as i32)));
    assert!(
        has_topology(&caps),
        "VOLUME_ACCESSIBILITY_CONSTRAINTS not advertised"
    );
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    let mut c = drv.controller().await;
    let ccaps: Vec<i32> = c
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type)
        .map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type)
        .collect();
    for want in [
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
        Cap::ModifyVolume,
    ] {
        assert!(
            ccaps.contains(&(want as i32)),
            "missing capability {want:?}"
        );
    }

    // ---------------------------------------------------------- CreateVolume
    let mut bad = create_req("", 10 * MIB);
    assert_eq!(
        code(c.create_volume(bad.clone()).await),
        Code::InvalidArgument,
        "no name"
    );
    bad.name = "v-bad".into();
    bad.volume_capabilities.clear();
    assert_eq!(
        code(c.create_volume(bad.clone()).await),
        Code::InvalidArgument,
        "no capabilities"
    );
    bad.volume_capabilities = vec![csi::VolumeCapability {
        access_type: None,
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }];
    assert_eq!(
        code(c.create_volume(bad.clone()).await),
        Code::InvalidArgument,
        "no access type"
    );
    bad.volume_capabilities = vec![cap("ext4", Mode::MultiNodeMultiWriter)];
    assert_eq!(
        code(c.create_volume(bad.clone()).await),
        Code::InvalidArgument,
        "shared filesystem"
    );
    bad.volume_capabilities = vec![rwo()];
    bad.parameters = HashMap::from([("colour".into(), "red".into())]);
    assert_eq!(
        code(c.create_volume(bad.clone()).await),
        Code::InvalidArgument,
        "unknown parameter"
    );
    bad.parameters = params("5");
    assert_eq!(
        code(c.create_volume(bad.clone()).await),
        Code::InvalidArgument,
        "replicas 5"
    );
    bad.parameters = params("1");
    bad.capacity_range = range(5000, 6000);
    assert_eq!(
        code(c.create_volume(bad.clone()).await),
        Code::OutOfRange,
        "no 4 KiB multiple in range"
    );
    bad.capacity_range = range(-1, 0);
    assert_eq!(
        code(c.create_volume(bad.clone()).await),
        Code::InvalidArgument,
        "negative"
    );

    let v1 = create(&mut c, create_req("pvc-one", 10 * MIB + 1)).await;
    assert!(
        v1.capacity_bytes > 10 * MIB && v1.capacity_bytes % 4096 == 0,
        "{v1:?}"
    );
    assert_eq!(
        v1.volume_context.get("portal").map(String::as_str),
        Some(PORTAL)
    );
    assert!(v1.volume_context.contains_key("targetIqn"));
    // Idempotent by name.
    let again = create(&mut c, create_req("pvc-one", 10 * MIB + 1)).await;
    assert_eq!(again.volume_id, v1.volume_id);
    assert_eq!(again.volume_context, v1.volume_context);
    // A range the existing volume satisfies is the same volume too.
    let mut r = create_req("pvc-one", 0);
    r.capacity_range = range(MIB, 64 * MIB);
    assert_eq!(create(&mut c, r).await.volume_id, v1.volume_id);
    // Incompatible re-creates: ALREADY_EXISTS.
    assert_eq!(
        code(c.create_volume(create_req("pvc-one", 20 * MIB)).await),
        Code::AlreadyExists
    );
    let mut r = create_req("pvc-one", 10 * MIB + 1);
    r.parameters = params("2");
    assert_eq!(code(c.create_volume(r).await), Code::AlreadyExists);
    // Names are any Unicode the spec allows.
    let uni = create(&mut c, create_req("données/β 1_x", 4 * MIB)).await;
    assert_eq!(
        create(&mut c, create_req("données/β 1_x", 4 * MIB))
            .await
            .volume_id,
        uni.volume_id
    );
    assert_ne!(uni.volume_id, v1.volume_id);
    // Concurrent creates of one name: one volume; losers may be ABORTED.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut cc = c.clone();
        tasks.push(tokio::spawn(async move {
            cc.create_volume(create_req("pvc-race", 8 * MIB)).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => ids.push(r.into_inner().volume.unwrap().volume_id),
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert!(!ids.is_empty());
    ids.dedup();
    assert_eq!(ids.len(), 1, "one name made several volumes: {ids:?}");
    let race = ids[0].clone();
    // Sources that do not exist: NOT_FOUND.
    let mut r = create_req("pvc-from-nothing", 4 * MIB);
    r.volume_content_source = from_snapshot("00000000-0000-4000-8000-000000000000");
    assert_eq!(code(c.create_volume(r.clone()).await), Code::NotFound);
    r.volume_content_source = from_volume("not-a-volume");
    assert_eq!(code(c.create_volume(r).await), Code::NotFound);

    // ---------------------------------------------------------- Validate
    let vreq =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
    assert_eq!(
        code(c.validate_volume_capabilities(vreq("", vec![rwo()])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(vreq(&v1.volume_id, vec![]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(vreq(
                "00000000-0000-4000-8000-000000000000",
                vec![rwo()]
            ))
            .await
        ),
        Code::NotFound
    );
    let ok = c
        .validate_volume_capabilities(vreq(
            &v1.volume_id,
            vec![rwo(), cap("block", Mode::MultiNodeMultiWriter)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    let no = c
        .validate_volume_capabilities(vreq(
            &v1.volume_id,
            vec![cap("ext4", Mode::MultiNodeMultiWriter)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");
    // The volume's own context is confirmed, another LUN's is not.
    let mut with_ctx = vreq(&v1.volume_id, vec![rwo()]);
    with_ctx.volume_context = v1.volume_context.clone();
    assert!(c
        .validate_volume_capabilities(with_ctx.clone())
        .await
        .unwrap()
        .into_inner()
        .confirmed
        .is_some());
    with_ctx.volume_context = uni.volume_context.clone();
    let no = c
        .validate_volume_capabilities(with_ctx)
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none(), "{no:?}");
    let mut same = vreq(&v1.volume_id, vec![rwo()]);
    same.parameters = params("1");
    assert!(c
        .validate_volume_capabilities(same.clone())
        .await
        .unwrap()
        .into_inner()
        .confirmed
        .is_some());
    same.parameters = params("2");
    assert!(
        c.validate_volume_capabilities(same)
            .await
            .unwrap()
            .into_inner()
            .confirmed
            .is_none(),
        "other replication factor"
    );
    let mut with_params = vreq(&v1.volume_id, vec![rwo()]);
    with_params.parameters = HashMap::from([("colour".into(), "red".into())]);
    let no = c
        .validate_volume_capabilities(with_params)
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none(), "{no:?}");

    // ---------------------------------------------------------- Publish
    let empty = csi::ControllerPublishVolumeRequest::default();
    assert_eq!(
        code(c.controller_publish_volume(empty.clone()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: v1.volume_id.clone(),
                volume_capability: Some(rwo()),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "no node id"
    );
    assert_eq!(
        code(
            c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: v1.volume_id.clone(),
                node_id: NODE1.into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "no capability"
    );
    assert_eq!(
        publish(&mut c, "00000000-0000-4000-8000-000000000000", NODE1, rwo())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        publish(&mut c, &v1.volume_id, "node-one", rwo())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "unknown node"
    );
    assert!(
        meta_acl(&mut admin, &v1.volume_id).await.is_empty(),
        "created volumes are masked"
    );
    let ctx = publish(&mut c, &v1.volume_id, NODE1, rwo()).await.unwrap();
    for k in ["targetIqn", "lun", "vpdSerial", "naa", "portal"] {
        assert!(ctx.contains_key(k), "publish context lacks {k}: {ctx:?}");
    }
    assert_eq!(ctx["vpdSerial"], v1.volume_id.replace('-', ""));
    // The NAA id the LUN reports (VPD 0x83) names the volume too; the node
    // checks both.
    assert_eq!(
        ironblock_csi::names::naa_volume_prefix(&ctx["naa"]).as_deref(),
        Some(&ctx["vpdSerial"][..25])
    );
    assert_eq!(
        meta_acl(&mut admin, &v1.volume_id).await,
        vec![NODE1.to_string()]
    );
    assert_eq!(
        publish(&mut c, &v1.volume_id, NODE1, rwo()).await.unwrap(),
        ctx,
        "idempotent"
    );
    assert_eq!(
        publish(&mut c, &v1.volume_id, NODE2, rwo())
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition,
        "single-node volume on a second node"
    );
    // Published: DeleteVolume refuses.
    assert_eq!(
        delete(&mut c, &v1.volume_id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // ListVolumes / ControllerGetVolume report the node.
    let all = list_all_volumes(&mut c, 0).await;
    let e = all
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == v1.volume_id)
        .unwrap();
    assert_eq!(
        e.status.as_ref().unwrap().published_node_ids,
        vec![NODE1.to_string()]
    );
    let g = get_volume(&mut c, &v1.volume_id).await.unwrap();
    let st = g.status.unwrap();
    assert_eq!(st.published_node_ids, vec![NODE1.to_string()]);
    assert!(!st.volume_condition.unwrap().abnormal);
    assert_eq!(g.volume.unwrap().capacity_bytes, v1.capacity_bytes);
    // Unpublish: idempotent; an unknown volume counts as unpublished.
    assert_eq!(
        code(
            c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    unpublish(&mut c, &v1.volume_id, NODE1).await.unwrap();
    unpublish(&mut c, &v1.volume_id, NODE1).await.unwrap();
    unpublish(&mut c, "00000000-0000-4000-8000-000000000000", NODE1)
        .await
        .unwrap();
    assert!(meta_acl(&mut admin, &v1.volume_id).await.is_empty());
    // A raw block multi-writer volume goes to two nodes; an empty node id
    // unpublishes from all.
    let mut r = create_req("pvc-shared", 4 * MIB);
    r.volume_capabilities = vec![cap("block", Mode::MultiNodeMultiWriter)];
    let shared = create(&mut c, r).await;
    publish(
        &mut c,
        &shared.volume_id,
        NODE1,
        cap("block", Mode::MultiNodeMultiWriter),
    )
    .await
    .unwrap();
    publish(
        &mut c,
        &shared.volume_id,
        NODE2,
        cap("block", Mode::MultiNodeMultiWriter),
    )
    .await
    .unwrap();
    assert_eq!(meta_acl(&mut admin, &shared.volume_id).await.len(), 2);
    unpublish(&mut c, &shared.volume_id, "").await.unwrap();
    assert!(meta_acl(&mut admin, &shared.volume_id).await.is_empty());

    // Read-only publications: `readonly` (or a reader-only access mode)
    // puts the node on the ACL read-only; the same flag again is OK, the
    // other one ALREADY_EXISTS (spec: "incompatible with the specified
    // volume_capability or readonly flag"); unpublish ignores the mode.
    let readers_cap = cap("ext4", Mode::MultiNodeReaderOnly);
    let mut r = create_req("pvc-readers", 4 * MIB);
    r.volume_capabilities = vec![rwo(), readers_cap.clone()];
    let readers = create(&mut c, r).await;
    let rid = readers.volume_id.clone();
    let ctx = publish_ro(&mut c, &rid, NODE1, rwo(), true).await.unwrap();
    assert_eq!(
        ctx.get("readOnly").map(String::as_str),
        Some("true"),
        "the node learns it must mount read-only: {ctx:?}"
    );
    assert_eq!(
        publish_ro(&mut c, &rid, NODE1, rwo(), true).await.unwrap(),
        ctx,
        "a read-only re-publish is idempotent"
    );
    assert_eq!(
        meta_acl_modes(&mut admin, &rid).await,
        (vec![NODE1.to_string()], vec![NODE1.to_string()])
    );
    let e = publish_ro(&mut c, &rid, NODE1, rwo(), false)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::AlreadyExists,
        "read-write after read-only: {e:?}"
    );
    assert_eq!(
        meta_acl_modes(&mut admin, &rid).await.1,
        vec![NODE1.to_string()],
        "a refused re-publish changes nothing"
    );
    unpublish(&mut c, &rid, NODE1).await.unwrap();
    assert_eq!(meta_acl_modes(&mut admin, &rid).await, (vec![], vec![]));
    // Read-write first, then read-only: ALREADY_EXISTS as well.
    let ctx = publish_ro(&mut c, &rid, NODE1, rwo(), false).await.unwrap();
    assert!(!ctx.contains_key("readOnly"), "{ctx:?}");
    publish_ro(&mut c, &rid, NODE1, rwo(), false).await.unwrap();
    let e = publish_ro(&mut c, &rid, NODE1, rwo(), true)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::AlreadyExists,
        "read-only after read-write: {e:?}"
    );
    assert_eq!(
        meta_acl_modes(&mut admin, &rid).await,
        (vec![NODE1.to_string()], vec![])
    );
    unpublish(&mut c, &rid, NODE1).await.unwrap();
    // A reader-only access mode is read-only without the flag, on several
    // nodes; a read-write re-publish of one of them is ALREADY_EXISTS.
    publish(&mut c, &rid, NODE1, readers_cap.clone())
        .await
        .unwrap();
    publish_ro(&mut c, &rid, NODE2, readers_cap.clone(), true)
        .await
        .unwrap();
    publish(&mut c, &rid, NODE1, readers_cap.clone())
        .await
        .unwrap();
    let mut both = vec![NODE1.to_string(), NODE2.to_string()];
    both.sort();
    assert_eq!(
        meta_acl_modes(&mut admin, &rid).await,
        (both.clone(), both.clone())
    );
    let e = publish_ro(&mut c, &rid, NODE2, rwo(), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // ListVolumes and ControllerGetVolume list read-only nodes like others.
    let all = list_all_volumes(&mut c, 0).await;
    let e = all
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == rid)
        .unwrap();
    let mut nodes = e.status.as_ref().unwrap().published_node_ids.clone();
    nodes.sort();
    assert_eq!(nodes, both);
    unpublish(&mut c, &rid, NODE2).await.unwrap();
    assert_eq!(
        meta_acl_modes(&mut admin, &rid).await,
        (vec![NODE1.to_string()], vec![NODE1.to_string()])
    );
    unpublish(&mut c, &rid, "").await.unwrap();
    assert_eq!(meta_acl_modes(&mut admin, &rid).await, (vec![], vec![]));

    // ---------------------------------------------------------- ListVolumes
    let full = list_all_volumes(&mut c, 0).await;
    let paged = list_all_volumes(&mut c, 2).await;
    let ids = |v: &[csi::list_volumes_response::Entry]| -> Vec<String> {
        v.iter()
            .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
            .collect()
    };
    assert!(full.len() >= 4);
    assert_eq!(ids(&full), ids(&paged));
    for want in [&v1.volume_id, &uni.volume_id, &race, &shared.volume_id] {
        assert!(ids(&full).contains(want));
    }
    assert_eq!(
        code(c.list_volumes(list_volumes_req(0, "bogus")).await),
        Code::Aborted
    );
    assert_eq!(
        code(c.list_volumes(list_volumes_req(-1, "")).await),
        Code::InvalidArgument
    );

    // ---------------------------------------------------------- GetCapacity
    let cap1 = capacity(&mut c, "1").await;
    assert!(cap1.available_capacity > 0, "{cap1:?}");
    let cap2 = capacity(&mut c, "2").await;
    assert!(cap2.available_capacity <= cap1.available_capacity / 2 + 4096);
    let cap3 = capacity(&mut c, "3").await;
    assert_eq!(cap3.available_capacity, 0, "3 replicas on 2 chunks");

    // ---------------------------------------------------------- Snapshots
    assert_eq!(
        snapshot(&mut c, &v1.volume_id, "")
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        snapshot(&mut c, "", "snap-1").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        snapshot(&mut c, "00000000-0000-4000-8000-000000000000", "snap-x")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let s1 = snapshot(&mut c, &v1.volume_id, "snap-1").await.unwrap();
    assert!(s1.ready_to_use);
    assert_eq!(s1.size_bytes, v1.capacity_bytes);
    assert_eq!(s1.source_volume_id, v1.volume_id);
    assert!(s1.creation_time.is_some());
    assert_eq!(
        snapshot(&mut c, &v1.volume_id, "snap-1")
            .await
            .unwrap()
            .snapshot_id,
        s1.snapshot_id
    );
    assert_eq!(
        snapshot(&mut c, &uni.volume_id, "snap-1")
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists,
        "snapshot name taken by another volume's snapshot"
    );
    // ABORTED while the same operation is in flight: a frozen chunk holds
    // CreateSnapshot (meta waits for every live chunk to apply it), so of
    // two calls for the same snapshot name one is in flight and the other
    // is answered ABORTED at once.
    chunks[1].pause();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let mut cc = c.clone();
            let v = uni.volume_id.clone();
            tokio::spawn(async move { snapshot(&mut cc, &v, "snap-2").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    chunks[1].resume();
    let mut done = Vec::new();
    let mut aborted = 0;
    for t in calls {
        match t.await.unwrap() {
            Ok(s) => done.push(s),
            Err(e) if e.code() == Code::Aborted => aborted += 1,
            Err(e) => panic!("CreateSnapshot: {e:?}"),
        }
    }
    assert_eq!(
        (done.len(), aborted),
        (1, 1),
        "one call in flight, the other ABORTED"
    );
    let s2 = done.remove(0);
    assert_eq!(
        snapshot(&mut c, &uni.volume_id, "snap-2")
            .await
            .unwrap()
            .snapshot_id,
        s2.snapshot_id
    );
    let lc = c.clone();
    let list = move |r: csi::ListSnapshotsRequest| {
        let mut c = lc.clone();
        async move { list_snapshots(&mut c, r).await }
    };
    let by_id = list(csi::ListSnapshotsRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(by_id.entries.len(), 1);
    let by_src = list(csi::ListSnapshotsRequest {
        source_volume_id: uni.volume_id.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(by_src.entries.len(), 1);
    assert_eq!(
        by_src.entries[0].snapshot.as_ref().unwrap().snapshot_id,
        s2.snapshot_id
    );
    let none = list(csi::ListSnapshotsRequest {
        snapshot_id: "00000000-0000-4000-8000-000000000000".into(),
        ..Default::default()
    })
    .await;
    assert!(none.entries.is_empty());
    let page1 = list(csi::ListSnapshotsRequest {
        max_entries: 1,
        ..Default::default()
    })
    .await;
    assert_eq!(page1.entries.len(), 1);
    assert!(!page1.next_token.is_empty());
    let page2 = list(csi::ListSnapshotsRequest {
        max_entries: 1,
        starting_token: page1.next_token.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(page2.entries.len(), 1);
    assert_ne!(page1.entries[0], page2.entries[0]);
    assert_eq!(
        code(
            c.list_snapshots(csi::ListSnapshotsRequest {
                starting_token: "zzz".into(),
                ..Default::default()
            })
            .await
        ),
        Code::Aborted
    );
    // A volume from the snapshot.
    let from_snap = |name: &str, size: i64, lim: i64| {
        let mut r = create_req(name, size);
        r.capacity_range = range(size, lim);
        r.volume_content_source = from_snapshot(&s1.snapshot_id);
        r
    };
    assert_eq!(
        code(c.create_volume(from_snap("pvc-small", 0, MIB)).await),
        Code::OutOfRange,
        "limit below the snapshot"
    );
    let clone = create(&mut c, from_snap("pvc-restore", 0, 0)).await;
    assert!(clone.capacity_bytes >= s1.size_bytes);
    assert!(matches!(
        clone.content_source.as_ref().and_then(|s| s.r#type.as_ref()),
        Some(Source::Snapshot(s)) if s.snapshot_id == s1.snapshot_id
    ));
    assert_eq!(
        create(&mut c, from_snap("pvc-restore", 0, 0))
            .await
            .volume_id,
        clone.volume_id
    );
    // The same name without the source is another volume: ALREADY_EXISTS.
    assert_eq!(
        code(
            c.create_volume(create_req("pvc-restore", clone.capacity_bytes))
                .await
        ),
        Code::AlreadyExists
    );
    // In use: snapshot with a clone, volume with snapshots.
    assert_eq!(
        delete_snapshot(&mut c, &s1.snapshot_id)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        delete(&mut c, &v1.volume_id).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // A volume cloned from a volume.
    let mut r = create_req("pvc-copy", 0);
    r.capacity_range = None;
    r.volume_content_source = from_volume(&uni.volume_id);
    let copy = create(&mut c, r.clone()).await;
    assert_eq!(copy.capacity_bytes, uni.capacity_bytes);
    assert_eq!(
        create(&mut c, r).await.volume_id,
        copy.volume_id,
        "clone idempotent"
    );
    // A clone that meta refuses (3 replicas on 2 chunks) leaves no hidden
    // snapshot behind.
    let mut r3 = create_req("pvc-copy-rf3", 0);
    r3.capacity_range = None;
    r3.parameters = params("3");
    r3.volume_content_source = from_volume(&uni.volume_id);
    assert_eq!(code(c.create_volume(r3).await), Code::FailedPrecondition);
    let hidden = admin
        .client()
        .list_snapshots(pb::ListSnapshotsRequest {
            volume_id: uni.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(
        hidden.len(),
        2,
        "snap-2 and pvc-copy's hidden snapshot only: {hidden:?}"
    );
    // Its hidden snapshot is not listed.
    let listed = list(csi::ListSnapshotsRequest {
        source_volume_id: uni.volume_id.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(listed.entries.len(), 1);

    // ---------------------------------------------------------- Expand
    let ereq = |id: &str, req: i64, lim: i64, c: Option<csi::VolumeCapability>| {
        csi::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: range(req, lim),
            volume_capability: c,
            ..Default::default()
        }
    };
    assert_eq!(
        code(
            c.controller_expand_volume(ereq("", 20 * MIB, 0, None))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_range = ereq(&v1.volume_id, 0, 0, None);
    no_range.capacity_range = None;
    assert_eq!(
        code(c.controller_expand_volume(no_range).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_expand_volume(ereq(
                "00000000-0000-4000-8000-000000000000",
                20 * MIB,
                0,
                None
            ))
            .await
        ),
        Code::NotFound
    );
    let grown = c
        .controller_expand_volume(ereq(&clone.volume_id, 40 * MIB, 0, Some(rwo())))
        .await
        .unwrap()
        .into_inner();
    assert!(grown.capacity_bytes >= 40 * MIB && grown.node_expansion_required);
    let again = c
        .controller_expand_volume(ereq(&clone.volume_id, 40 * MIB, 0, Some(rwo())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.capacity_bytes, grown.capacity_bytes, "idempotent");
    let smaller = c
        .controller_expand_volume(ereq(&clone.volume_id, 20 * MIB, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        smaller.capacity_bytes, grown.capacity_bytes,
        "never shrinks"
    );
    assert_eq!(
        code(
            c.controller_expand_volume(ereq(&clone.volume_id, 0, 20 * MIB, None))
                .await
        ),
        Code::OutOfRange
    );
    let block = c
        .controller_expand_volume(ereq(
            &shared.volume_id,
            8 * MIB,
            0,
            Some(cap("block", Mode::MultiNodeMultiWriter)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !block.node_expansion_required,
        "raw block needs no node step"
    );
    let g = get_volume(&mut c, &clone.volume_id).await.unwrap();
    assert_eq!(g.volume.unwrap().capacity_bytes, grown.capacity_bytes);

    // ---------------------------------------------------------- GetVolume
    assert_eq!(
        get_volume(&mut c, "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        get_volume(&mut c, "00000000-0000-4000-8000-000000000000")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // ---------------------------------------------------------- ModifyVolume
    // The replication factor is the one mutable parameter (v1 has 1; the
    // cluster two chunks).
    let mreq = |id: &str, kv: &[(&str, &str)]| csi::ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let refused: [(csi::ControllerModifyVolumeRequest, Code, &str); 7] = [
        (
            mreq("", &[("replicas", "2")]),
            Code::InvalidArgument,
            "no id",
        ),
        (
            mreq(&v1.volume_id, &[]),
            Code::InvalidArgument,
            "nothing to modify",
        ),
        (
            mreq(&v1.volume_id, &[("thin", "false")]),
            Code::InvalidArgument,
            "not a mutable parameter",
        ),
        (
            mreq(&v1.volume_id, &[("replicas", "5")]),
            Code::InvalidArgument,
            "replicas 5",
        ),
        (
            mreq(
                &v1.volume_id,
                &[("replicas", "2"), ("replicationFactor", "1")],
            ),
            Code::InvalidArgument,
            "the two names disagree",
        ),
        (
            mreq("00000000-0000-4000-8000-000000000000", &[("replicas", "2")]),
            Code::NotFound,
            "unknown volume",
        ),
        (
            mreq(&v1.volume_id, &[("replicas", "3")]),
            Code::FailedPrecondition,
            "three replicas on two chunks",
        ),
    ];
    for (req, want, why) in refused {
        assert_eq!(code(c.controller_modify_volume(req).await), want, "{why}");
    }
    let meta_replicas = |admin: &mut Admin, id: String| {
        let mut client = admin.client().clone();
        async move {
            client
                .get_volume(pb::VolumeRef {
                    r#ref: Some(pb::volume_ref::Ref::Id(id)),
                })
                .await
                .expect("meta GetVolume")
                .into_inner()
                .volume
                .expect("volume")
                .replicas
        }
    };
    assert_eq!(meta_replicas(&mut admin, v1.volume_id.clone()).await, 1);
    // Raised, idempotently; meta has it and the copies finish (bounded).
    for _ in 0..2 {
        c.controller_modify_volume(mreq(&v1.volume_id, &[("replicas", "2")]))
            .await
            .expect("ControllerModifyVolume");
    }
    assert_eq!(meta_replicas(&mut admin, v1.volume_id.clone()).await, 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cond = get_volume(&mut c, &v1.volume_id)
            .await
            .unwrap()
            .status
            .unwrap()
            .volume_condition
            .unwrap();
        assert!(!cond.abnormal, "{cond:?}");
        if cond.message == "healthy" {
            break;
        }
        assert!(Instant::now() < deadline, "still {cond:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Mutable parameters win over the StorageClass's in Validate.
    let mut mutated = vreq(&v1.volume_id, vec![rwo()]);
    mutated.parameters = params("1");
    mutated.mutable_parameters = params("2");
    let confirmed = c
        .validate_volume_capabilities(mutated.clone())
        .await
        .unwrap()
        .into_inner()
        .confirmed
        .expect("confirmed with the volume's current factor");
    assert_eq!(confirmed.mutable_parameters, mutated.mutable_parameters);
    mutated.mutable_parameters = params("3");
    assert!(c
        .validate_volume_capabilities(mutated)
        .await
        .unwrap()
        .into_inner()
        .confirmed
        .is_none());
    // ABORTED while a modify of the same volume is in flight: meta frozen
    // holds the first call; the second is answered at once.
    meta.pause();
    let first = {
        let mut cc = c.clone();
        let req = mreq(&v1.volume_id, &[("replicationFactor", "1")]);
        tokio::spawn(async move { cc.controller_modify_volume(req).await })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = tokio::time::timeout(
        Duration::from_secs(5),
        c.controller_modify_volume(mreq(&v1.volume_id, &[("replicas", "1")])),
    )
    .await
    .expect("ABORTED at once, meta is not asked");
    meta.resume();
    assert_eq!(code(second), Code::Aborted);
    first
        .await
        .unwrap()
        .expect("the call in flight completes once meta is back");
    // Lowered (by the other name): at once, one member per extent.
    assert_eq!(meta_replicas(&mut admin, v1.volume_id.clone()).await, 1);
    for e in admin.extents(&v1.volume_id).await {
        assert_eq!(e.replicas.len(), 1, "{e:?}");
        assert!(e.learners.is_empty(), "{e:?}");
    }

    // ---------------------------------------------------------- Topology
    // One segment: the cluster, meta's id. Every volume is accessible from
    // it (CreateVolume, ListVolumes, ControllerGetVolume agree).
    let cid = admin
        .client()
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .expect("meta ClusterStatus")
        .into_inner()
        .cluster_id;
    let ours = topo(&[(TOPOLOGY_KEY, &cid)]);
    let theirs = topo(&[(TOPOLOGY_KEY, "11111111-2222-4333-8444-555555555555")]);
    let zone_only = topo(&[("topology.kubernetes.io/zone", "z1")]);
    assert_eq!(v1.accessible_topology, vec![ours.clone()], "CreateVolume");
    let t1 = create(
        &mut c,
        create_in("pvc-topo", vec![ours.clone()], vec![ours.clone()]),
    )
    .await;
    assert_eq!(t1.accessible_topology, vec![ours.clone()]);
    // Idempotent, also with a requisite list naming other clusters too
    // and a finer domain of this one.
    let finer = topo(&[(TOPOLOGY_KEY, &cid), ("topology.kubernetes.io/zone", "z1")]);
    for req in [
        create_in("pvc-topo", vec![ours.clone()], vec![ours.clone()]),
        create_in("pvc-topo", vec![theirs.clone(), ours.clone()], vec![]),
        create_in("pvc-topo", vec![finer.clone()], vec![finer.clone()]),
        create_req("pvc-topo", 4 * MIB),
    ] {
        assert_eq!(create(&mut c, req).await.volume_id, t1.volume_id);
    }
    // The existing volume cannot meet another cluster's requisite:
    // ALREADY_EXISTS (the spec's "incompatible accessibility_requirements").
    assert_eq!(
        code(
            c.create_volume(create_in("pvc-topo", vec![theirs.clone()], vec![]))
                .await
        ),
        Code::AlreadyExists
    );
    // A new volume cannot be provisioned there: RESOURCE_EXHAUSTED, and
    // nothing is created.
    let before = list_all_volumes(&mut c, 0).await.len();
    for (what, req) in [
        (
            "another cluster",
            create_in("pvc-elsewhere", vec![theirs.clone()], vec![theirs.clone()]),
        ),
        (
            "no cluster named",
            create_in("pvc-elsewhere", vec![zone_only.clone()], vec![]),
        ),
    ] {
        let e = c.create_volume(req).await.expect_err(what);
        assert_eq!(e.code(), Code::ResourceExhausted, "{what}: {e:?}");
        assert!(e.message().contains(&cid), "{what}: {}", e.message());
    }
    assert_eq!(list_all_volumes(&mut c, 0).await.len(), before);
    // Preferred alone is a wish (the SP may choose any topology): the
    // volume is made here and says so.
    let t2 = create(
        &mut c,
        create_in("pvc-prefers-elsewhere", vec![], vec![theirs.clone()]),
    )
    .await;
    assert_eq!(t2.accessible_topology, vec![ours.clone()]);
    let listed = list_all_volumes(&mut c, 3).await;
    assert!(listed.len() >= 3);
    for e in &listed {
        let v = e.volume.as_ref().expect("volume");
        assert_eq!(v.accessible_topology, vec![ours.clone()], "{}", v.volume_id);
    }
    let g = get_volume(&mut c, &t1.volume_id).await.unwrap();
    assert_eq!(g.volume.unwrap().accessible_topology, vec![ours.clone()]);
    // Validation of a topology-provisioned volume is unchanged.
    assert!(c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: t1.volume_id.clone(),
            volume_capabilities: vec![rwo()],
            volume_context: t1.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .confirmed
        .is_some());
    // Capacity: all of it from this cluster (or a finer domain of it),
    // none from another or from a topology naming no cluster.
    let here = capacity_from(&mut c, Some(ours.clone())).await;
    assert!(here > 0, "capacity from this cluster: {here}");
    assert!(capacity_from(&mut c, Some(finer.clone())).await > 0);
    assert!(capacity_from(&mut c, None).await > 0);
    assert_eq!(capacity_from(&mut c, Some(theirs.clone())).await, 0);
    assert_eq!(capacity_from(&mut c, Some(zone_only.clone())).await, 0);

    // A node plugin given meta's address (as the DaemonSet does) reports
    // the same segment as its accessible topology.
    let node_dir = dir.path().join("csi-node-meta");
    let node_sock = format!("unix://{}", node_dir.join("csi.sock").display());
    let node_state = dir.path().join("node-state");
    let meta_addr = meta.addr().to_string();
    let node_drv = CsiProcess::spawn(
        &node_dir,
        &[],
        &[
            ("CSI_ENDPOINT", node_sock.as_str()),
            ("IRONBLOCK_CSI_MODE", "node"),
            ("NODE_ID", "worker-topo"),
            ("IRONBLOCK_META", meta_addr.as_str()),
            ("IRONBLOCK_CSI_STATE_DIR", node_state.to_str().unwrap()),
        ],
    );
    let mut nid = node_drv.identity().await;
    assert!(has_topology(&plugin_capabilities(&mut nid).await));
    let info = node_drv
        .node()
        .await
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.accessible_topology, Some(ours.clone()));
    drop(node_drv);

    // A controller configured with this cluster's id (any spelling) works;
    // with another one it refuses: Probe and calls FAILED_PRECONDITION.
    let same = CsiProcess::start(
        &dir.path().join("csi-same-cluster"),
        "controller",
        &[
            "--meta",
            &meta_addr,
            "--cluster-id",
            &cid.replace('-', "").to_ascii_uppercase(),
        ],
    );
    let mut sid = same.identity().await;
    assert_eq!(
        sid.probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    let mut sc = same.controller().await;
    let g = get_volume(&mut sc, &t1.volume_id).await.unwrap();
    assert_eq!(g.volume.unwrap().accessible_topology, vec![ours.clone()]);
    drop(same);
    let wrong = CsiProcess::start(
        &dir.path().join("csi-wrong-cluster"),
        "controller",
        &[
            "--meta",
            &meta_addr,
            "--cluster-id",
            "11111111-2222-4333-8444-555555555555",
        ],
    );
    let mut wid = wrong.identity().await;
    assert_eq!(
        code(wid.probe(csi::ProbeRequest {}).await),
        Code::FailedPrecondition
    );
    let mut wc = wrong.controller().await;
    assert_eq!(
        code(
            wc.create_volume(create_req("pvc-wrong-cluster", 4 * MIB))
                .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(wc.list_volumes(list_volumes_req(0, "")).await),
        Code::FailedPrecondition
    );
    drop(wrong);
    for v in [&t1.volume_id, &t2.volume_id] {
        delete(&mut c, v).await.unwrap();
    }

    // ---------------------------------------------------------- Delete
    assert_eq!(
        delete(&mut c, "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    delete(&mut c, "00000000-0000-4000-8000-000000000000")
        .await
        .unwrap();
    delete(&mut c, "not-even-an-id").await.unwrap();
    delete(&mut c, &clone.volume_id).await.unwrap();
    delete(&mut c, &clone.volume_id).await.unwrap();
    assert_eq!(
        delete_snapshot(&mut c, "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    delete_snapshot(&mut c, &s1.snapshot_id).await.unwrap();
    delete_snapshot(&mut c, &s1.snapshot_id).await.unwrap();
    delete_snapshot(&mut c, "00000000-0000-4000-8000-000000000000")
        .await
        .unwrap();
    delete(&mut c, &v1.volume_id).await.unwrap();
    // The volume clone goes, and with it its hidden snapshot, so the source
    // can go once its own snapshot is gone.
    delete(&mut c, &copy.volume_id).await.unwrap();
    delete_snapshot(&mut c, &s2.snapshot_id).await.unwrap();
    delete(&mut c, &uni.volume_id).await.unwrap();
    for v in [&race, &shared.volume_id, &readers.volume_id] {
        delete(&mut c, v).await.unwrap();
    }
    assert!(
        list_all_volumes(&mut c, 0).await.is_empty(),
        "every volume deleted"
    );
    assert!(list(csi::ListSnapshotsRequest::default())
        .await
        .entries
        .is_empty());
    assert_eq!(
        get_volume(&mut c, &v1.volume_id).await.unwrap_err().code(),
        Code::NotFound
    );
    // Every call was counted by method and code.
    let text = ironblock_tests::cluster::http_get(metrics, "/metrics")
        .await
        .expect("GET /metrics");
    for line in [
        "ironblock_csi_calls_total{method=\"CreateVolume\",code=\"AlreadyExists\"}",
        "ironblock_csi_calls_total{method=\"CreateVolume\",code=\"Ok\"}",
        "ironblock_csi_calls_total{method=\"ControllerPublishVolume\",code=\"FailedPrecondition\"}",
        "ironblock_csi_calls_total{method=\"ControllerPublishVolume\",code=\"AlreadyExists\"}",
        "ironblock_csi_calls_total{method=\"ListVolumes\",code=\"Aborted\"}",
        "ironblock_csi_call_seconds_count{method=\"DeleteVolume\"}",
    ] {
        assert!(text.contains(line), "metrics lack {line}:\n{text}");
    }
    drop(chunks);
    println!("CSI controller conformance: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_node_api() {
    let dir = scratch_dir("csi-node-");
    let sock = dir.path().join("csi").join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let state = dir.path().join("state");
    let drv = CsiProcess::spawn(
        &dir.path().join("csi"),
        &[],
        &[
            ("CSI_ENDPOINT", endpoint.as_str()),
            ("IRONBLOCK_CSI_MODE", "node"),
            ("NODE_ID", "Worker-7"),
            ("IRONBLOCK_CSI_STATE_DIR", state.to_str().unwrap()),
            ("IRONBLOCK_CLUSTER_ID", NODE_CLUSTER),
        ],
    );
    let mut id = drv.identity().await;
    let caps = plugin_capabilities(&mut id).await;
    assert!(
        !offers_the_controller(&caps),
        "a node-only process does not offer the controller"
    );
    assert!(has_topology(&caps), "VOLUME_ACCESSIBILITY_CONSTRAINTS");
    assert_eq!(
        id.probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    let mut ctl = drv.controller().await;
    assert_eq!(
        code(
            ctl.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
                .await
        ),
        Code::Unimplemented,
        "no Controller service in node mode"
    );

    let mut n = drv.node().await;
    let info = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "iqn.2026-11.dev.ironblock.node:worker-7");
    assert_eq!(
        info.accessible_topology,
        Some(topo(&[(TOPOLOGY_KEY, &NODE_CLUSTER.to_ascii_lowercase())])),
        "the configured cluster id, canonical, as the node's topology"
    );
    let ncaps: Vec<i32> = n
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type)
        .map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
        .collect();
    use csi::node_service_capability::rpc::Type as NCap;
    for want in [
        NCap::StageUnstageVolume,
        NCap::GetVolumeStats,
        NCap::ExpandVolume,
        NCap::VolumeCondition,
    ] {
        assert!(
            ncaps.contains(&(want as i32)),
            "missing node capability {want:?}"
        );
    }

    let vid = "0123abcd-0000-4000-8000-000000000001";
    let staging = dir.path().join("staging").to_string_lossy().into_owned();
    let target = dir.path().join("pod").to_string_lossy().into_owned();
    let stage = |f: &dyn Fn(&mut csi::NodeStageVolumeRequest)| {
        let mut r = csi::NodeStageVolumeRequest {
            volume_id: vid.into(),
            publish_context: HashMap::from([
                (
                    "targetIqn".to_string(),
                    "iqn.2026-11.dev.ironblock:t0".to_string(),
                ),
                ("lun".to_string(), "1".to_string()),
                ("portal".to_string(), PORTAL.to_string()),
            ]),
            staging_target_path: staging.clone(),
            volume_capability: Some(rwo()),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let bad_stages: [Refused<csi::NodeStageVolumeRequest>; 5] = [
        (
            "no volume id",
            |r| r.volume_id.clear(),
            Code::InvalidArgument,
        ),
        (
            "no staging path",
            |r| r.staging_target_path.clear(),
            Code::InvalidArgument,
        ),
        (
            "no capability",
            |r| r.volume_capability = None,
            Code::InvalidArgument,
        ),
        (
            "shared filesystem",
            |r| r.volume_capability = Some(cap("ext4", Mode::MultiNodeMultiWriter)),
            Code::FailedPrecondition,
        ),
        (
            "no target",
            |r| {
                r.publish_context.remove("targetIqn");
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, f, want) in bad_stages {
        assert_eq!(code(n.node_stage_volume(stage(&f)).await), want, "{what}");
    }

    let publish = |f: &dyn Fn(&mut csi::NodePublishVolumeRequest)| {
        let mut r = csi::NodePublishVolumeRequest {
            volume_id: vid.into(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(rwo()),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let bad_publishes: [Refused<csi::NodePublishVolumeRequest>; 5] = [
        (
            "no volume id",
            |r| r.volume_id.clear(),
            Code::InvalidArgument,
        ),
        (
            "no target path",
            |r| r.target_path.clear(),
            Code::InvalidArgument,
        ),
        (
            "no staging path",
            |r| r.staging_target_path.clear(),
            Code::FailedPrecondition,
        ),
        (
            "no capability",
            |r| r.volume_capability = None,
            Code::InvalidArgument,
        ),
        ("not staged", |_| {}, Code::FailedPrecondition),
    ];
    for (what, f, want) in bad_publishes {
        assert_eq!(
            code(n.node_publish_volume(publish(&f)).await),
            want,
            "{what}"
        );
    }

    // Teardown of what was never set up: OK, twice.
    let unpublish = |id: &str, target: &str| csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
    };
    let unstage = |id: &str, staging: &str| csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
    };
    for _ in 0..2 {
        n.node_unpublish_volume(unpublish(vid, &target))
            .await
            .unwrap();
        n.node_unstage_volume(unstage(vid, &staging)).await.unwrap();
    }
    assert_eq!(
        code(n.node_unpublish_volume(unpublish("", &target)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_unstage_volume(unstage(vid, "")).await),
        Code::InvalidArgument
    );
    // Stats and expansion of a volume this node does not have: NOT_FOUND.
    let stats = |path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: vid.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    assert_eq!(
        code(n.node_get_volume_stats(stats(&target)).await),
        Code::NotFound
    );
    assert_eq!(
        code(n.node_get_volume_stats(stats("")).await),
        Code::InvalidArgument
    );
    let expand = |id: &str| csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: target.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(n.node_expand_volume(expand(vid)).await),
        Code::NotFound
    );
    assert_eq!(
        code(n.node_expand_volume(expand("")).await),
        Code::InvalidArgument
    );
    assert!(state.is_dir(), "state dir from IRONBLOCK_CSI_STATE_DIR");
}

/// A node plugin without a cluster id (neither IRONBLOCK_CLUSTER_ID nor
/// meta's address) or with one that is no cluster id does not start: it
/// could not report its topology, and the volumes' node affinity would
/// never match it.
#[test]
fn csi_node_needs_a_cluster_id() {
    let dir = scratch_dir("csi-node-nocluster-");
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let state = dir.path().join("state");
    for (what, extra) in [
        ("no source", &[][..]),
        ("not a cluster id", &["--cluster-id", "prod-a"][..]),
    ] {
        let mut args = vec![
            "--endpoint",
            endpoint.as_str(),
            "--mode",
            "node",
            "--node-id",
            "w1",
            "--state-dir",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(ironblock_tests::bin_path("ironblock-csi"))
            .args(&args)
            .env_remove("IRONBLOCK_CLUSTER_ID")
            .env_remove("IRONBLOCK_META")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run ironblock-csi");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started anyway");
        assert!(err.contains("cluster"), "{what}: {err}");
        assert!(
            !dir.path().join("csi.sock").exists(),
            "{what}: socket served"
        );
    }
}

/// Without meta the controller is not healthy: Probe FAILED_PRECONDITION,
/// calls that need meta UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_controller_without_meta() {
    let dir = scratch_dir("csi-nometa-");
    let nowhere = format!("127.0.0.1:{}", ironblock_tests::free_port());
    let drv = CsiProcess::start(&dir.path().join("csi"), "controller", &["--meta", &nowhere]);
    let mut id = drv.identity().await;
    assert_eq!(
        code(id.probe(csi::ProbeRequest {}).await),
        Code::FailedPrecondition
    );
    let mut c = drv.controller().await;
    assert_eq!(
        code(c.create_volume(create_req("pvc-x", MIB)).await),
        Code::Unavailable
    );
    // Argument errors are still answered without meta.
    assert_eq!(
        code(c.create_volume(create_req("", MIB)).await),
        Code::InvalidArgument
    );
}
